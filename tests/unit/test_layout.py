"""The layout rules of docs/architecture.md, checked on the tree (run in `make test`).

Each stage lives in one room: flows/<stage>.py (a table of contents) -> tasks/<stage>.py
(Prefect tasks) -> llmflow/<stage>/ (the logic, no Prefect). No product module over 400
lines; the formatter owns the layout (at most 5 `fmt: skip`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("prepare", "finetune", "evaluate", "promote")
PRODUCT = ("llmflow", "flows", "tasks", "deployments")
MAX_LINES = 400
MAX_FLOW_BODY = 30


def product_modules() -> list[Path]:
    return sorted(p for d in PRODUCT for p in (ROOT / d).rglob("*.py"))


def decorated_with(node: ast.FunctionDef, name: str) -> bool:
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if (isinstance(target, ast.Name) and target.id == name) or (
            isinstance(target, ast.Attribute) and target.attr == name
        ):
            return True
    return False


def body_lines(fn: ast.FunctionDef) -> int:
    """Lines of a function's body, its docstring left out."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def test_each_stage_has_its_flow_tasks_and_logic_room():
    for stage in STAGES:
        assert (ROOT / "flows" / f"{stage}.py").is_file(), f"flows/{stage}.py"
        assert (ROOT / "tasks" / f"{stage}.py").is_file(), f"tasks/{stage}.py"
        assert (ROOT / "llmflow" / stage / "__init__.py").is_file(), f"llmflow/{stage}/"


@pytest.mark.parametrize("path", product_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_product_module_is_over_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)}: {lines} lines (at most {MAX_LINES})"


def test_flow_bodies_read_like_a_table_of_contents():
    flows = 0
    for path in sorted((ROOT / "flows").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and decorated_with(node, "flow"):
                flows += 1
                n = body_lines(node)
                assert n <= MAX_FLOW_BODY, f"flows/{path.name}:{node.name}: body of {n} lines"
    assert flows >= len(STAGES) + 1  # the four stages and the pipeline at least


def test_the_pipeline_composes_the_stage_functions():
    tree = ast.parse((ROOT / "flows" / "pipeline.py").read_text())
    imported = {
        (n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
    }
    for stage in ("prepare", "finetune", "evaluate"):
        assert (f"tasks.{stage}", f"{stage}_stage") in imported, stage
    assert ("tasks.promote", "gate_stage") in imported
    assert ("flows.promote", "promote") in imported


def test_flow_files_define_flows_only():
    """A deployment loads flows/<name>.py as a top-level module `<name>`, which the Ray
    workers cannot import (Ray ships the driver's cwd, not flows/): anything else defined
    there and used by a flow would be pickled by reference to it and fail on the workers."""
    for path in sorted((ROOT / "flows").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                assert isinstance(node, ast.FunctionDef) and decorated_with(node, "flow"), (
                    f"flows/{path.name}:{node.lineno}: {node.name} is not a flow: move it to tasks/"
                )


def test_flows_loaded_as_deployments_unpickle_where_flows_is_not_on_the_path(tmp_path):
    """What a deployment run sends to Ray (the flow object, in its run context) loads in a
    process whose sys.path has the project but not flows/, as on a Ray worker."""
    import subprocess
    import sys

    entrypoints = [f"flows/{f}.py:{f}" for f in (*STAGES, "pipeline", "check")]
    dump = (
        "import sys, cloudpickle\n"
        "from prefect.flows import load_flow_from_entrypoint\n"
        f"for i, ep in enumerate({entrypoints!r}):\n"
        f"    open(f'{tmp_path}/{{i}}.pkl', 'wb').write(cloudpickle.dumps(load_flow_from_entrypoint(ep)))\n"
    )
    subprocess.run([sys.executable, "-c", dump], cwd=ROOT, check=True, timeout=300)
    load = (
        "import pickle, sys\n"
        f"sys.path = [p for p in sys.path if not p.rstrip('/').endswith('flows')]\n"
        f"for i in range({len(entrypoints)}):\n"
        f"    pickle.load(open(f'{tmp_path}/{{i}}.pkl', 'rb'))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", load],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_logic_does_not_import_prefect_and_imports_ray_only_inside_functions(stage):
    for path in sorted((ROOT / "llmflow" / stage).glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
                assert not any(n.split(".")[0] == "prefect" for n in names), (
                    f"llmflow/{stage}/{path.name}:{node.lineno} imports prefect"
                )
        for node in tree.body:  # module level: no ray (a worker imports these modules too)
            if isinstance(node, ast.Import | ast.ImportFrom):
                top = (
                    (node.module or "") if isinstance(node, ast.ImportFrom) else node.names[0].name
                )
                assert top.split(".")[0] != "ray", f"llmflow/{stage}/{path.name}:{node.lineno}"


def test_tasks_modules_hold_prefect_tasks_not_logic():
    """A tasks/ module's functions are tasks (or their rollback hooks, cache keys and the
    flow-side helpers that run tasks): none is over 60 lines."""
    for path in sorted((ROOT / "tasks").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef):
                n = body_lines(node)
                assert n <= 60, f"tasks/{path.name}:{node.name}: {n} lines: move the logic out"


def test_the_formatter_owns_the_layout():
    skips = [
        f"{p.relative_to(ROOT)}:{i}"
        for d in (*PRODUCT, "tests", "bench")
        for p in (ROOT / d).rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"#\s*fmt:\s*(skip|off)", line)
    ]
    assert len(skips) <= 5, skips


def test_docs_architecture_names_every_module_of_the_stage_rooms():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = [
        str(p.relative_to(ROOT))
        for d in PRODUCT
        for p in (ROOT / d).rglob("*.py")
        if p.name != "__init__.py" and str(p.relative_to(ROOT)) not in doc
    ]
    assert not missing, f"docs/architecture.md does not name: {missing}"
