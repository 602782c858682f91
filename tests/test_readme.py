"""The README's library example runs as written and issues its certificate."""
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_library_example_runs(capsys):
    text = README.read_text()
    code = text.split("## Library use", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    assert "(1, 1e-05)-certified unlearning by operator 'gradient_clipping'" in capsys.readouterr().out
