"""scripts/doc_commands.py: the commands it finds in a page, and the ones it must not take
(quoted output, non-shell blocks, the section that records the run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("doc_commands", ROOT / "scripts/doc_commands.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["doc_commands"] = module
    spec.loader.exec_module(module)
    return module


doc_commands = _load()

AGENT_RUN = "edgeloop-agent run --config agent.json --listen 127.0.0.1:8470"
PAGE = """# Title

Run `edgeloop jobs list` or `.venv/bin/python -m benchmarks.fleet_rollout --help`; the
`edgeloop` CLI and `edgeloop-agent listening on http://HOST:PORT` are not commands. A span may
cross a line: `edgeloop-agent run --config agent.json
--listen 127.0.0.1:8470`.

```bash
# a comment
export A=1 \\
  B=2
EDGELOOP_X=1 edgeloop-server    # starts it
for i in $(seq 3); do
  echo $i
done
```

```
digits-2/
  bundle.json
edgeloop-agent install --config agent.json ./digits-2
```

```console
$ .venv/bin/python -m benchmarks.ingest_bench
backend  batched/s
```

```toml
trainer = "sklearn-mlp"
```

## Commands in the docs, run as written

`pip install 'edgeloop[server,s3]'` failed: quoted in the record, not a command to run.

### Its subsection

`edgeloop jobs trigger digits`

## Next

`edgeloop whoami --help`
"""


def test_blocks_and_inline_spans_in_page_order(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(PAGE)
    found = [(c.file, c.line, c.kind, c.command) for c in doc_commands.all_commands(tmp_path)]
    assert found == [
        ("README.md", 3, "inline", "edgeloop jobs list"),
        ("README.md", 3, "inline", ".venv/bin/python -m benchmarks.fleet_rollout --help"),
        (
            "README.md",
            5,
            "inline",
            "edgeloop-agent run --config agent.json --listen 127.0.0.1:8470",
        ),
        ("README.md", 10, "block", "export A=1 B=2"),
        ("README.md", 12, "block", "EDGELOOP_X=1 edgeloop-server    # starts it"),
        ("README.md", 13, "block", "for i in $(seq 3); do echo $i; done"),
        ("README.md", 21, "block", "edgeloop-agent install --config agent.json ./digits-2"),
        ("README.md", 25, "block", ".venv/bin/python -m benchmarks.ingest_bench"),
        ("README.md", 43, "inline", "edgeloop whoami --help"),
    ]


def test_the_repository_pages_hold_the_operating_session() -> None:
    commands = [c.command for c in doc_commands.all_commands(ROOT)]
    assert any(c.startswith("EDGELOOP_BOOTSTRAP_LINE=digits edgeloop-server") for c in commands)
    assert "edgeloop-agent listening on http://127.0.0.1:8470" not in commands
