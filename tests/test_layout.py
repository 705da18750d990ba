"""Layout rules (STYLE §3.1): the core imports torch and the standard library only; the domain
scripts never import each other and carry one identical infrastructure block."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = [f for f in ("cifar10_gaussian.py", "imagenet_masked.py", "owt_masked.py")
           if os.path.exists(os.path.join(ROOT, f))]


def imports(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    return names


def test_core_imports_only_torch_and_stdlib():
    assert imports("di4c_core.py") <= {"torch", "math", "typing"}


def test_domain_scripts_do_not_import_each_other():
    for s in SCRIPTS:
        assert not imports(s) & {os.path.splitext(o)[0] for o in SCRIPTS if o != s}, s


def infra_block(path):
    text = open(os.path.join(ROOT, path)).read()
    start = text.index("# Infrastructure (identical in the three domain scripts")
    end = text.index("be.copy_(bm)\n", start)                # update_ema closes the shared block
    return text[start:end]


def test_infrastructure_blocks_are_identical():
    assert len(SCRIPTS) >= 2
    blocks = {s: infra_block(s) for s in SCRIPTS}
    first = blocks[SCRIPTS[0]]
    for s, b in blocks.items():
        assert b == first, f"{s} infrastructure block differs from {SCRIPTS[0]}"
