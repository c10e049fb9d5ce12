"""The README's Python API snippets run exactly as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_python_api_snippets_run_as_written(capsys):
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    snippets = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(snippets) == 2
    namespace = {}
    for snippet in snippets:
        exec(compile(snippet, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert printed.count("BWCache (blockwise mode") == 0
    assert printed.count("BWCache (paper mode, δ=0.15") == 2
    assert namespace["video"].shape[1:] == (32, 32, 3)
    assert set(namespace["trace"]["branches"]) == {"cond", "uncond"}
    assert namespace["handle"].trace.reuse_fraction > 0
    assert not namespace["pipe"].transformer._forward_hooks
