"""Layout rules: the core imports torch and the standard library only; the domain scripts never
import each other and end with one identical infrastructure block (config and CLI, distributed
setup, logging, checkpoints, per-step RNG, the training loop), after the pipeline."""
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
    end = text.index("# End of the infrastructure block.\n", start)
    return text[start:end]


def test_infrastructure_blocks_are_identical_and_whole():
    assert len(SCRIPTS) == 3
    blocks = {s: infra_block(s) for s in SCRIPTS}
    first = blocks[SCRIPTS[0]]
    for s, b in blocks.items():
        assert b == first, f"{s} infrastructure block differs from {SCRIPTS[0]}"
    assert first.count("\n") <= 350, "the shared block grew: what it holds is listed above"
    tree = ast.parse(first)
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert names >= {"parse_config", "make_config", "check_config", "setup_dist", "Ctx",
                     "run_stages", "save_checkpoint", "load_checkpoint", "weights_id",
                     "check_lineage", "batch_plan", "accumulate", "lr_factor", "fit",
                     "epoch_batches"}
    for s in SCRIPTS:                       # nothing of the block is defined a second time
        text = open(os.path.join(ROOT, s)).read()
        tail = text[text.index(first) + len(first):]
        assert tail.count("\ndef ") == 0, f"{s}: the pipeline comes before the shared block"
        rest = text.replace(first, "")
        defined = {n.name for n in ast.parse(rest).body
                   if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert not defined & names, (s, defined & names)


MARKERS = ("SPEC" + " §", "STYLE" + " §", "CALIB" + "RATION", "../" + "shared")  # not literal


def test_repo_documents_itself():
    """docs/method.md exists, the README stays a short guide, and nothing points to files that are
    not in the repository (the team's working notes)."""
    assert os.path.exists(os.path.join(ROOT, "docs", "method.md"))
    assert len(open(os.path.join(ROOT, "README.md")).read().splitlines()) <= 160
    bad = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "data")]
        for f in files:
            if f.endswith((".py", ".md")):
                text = open(os.path.join(folder, f), encoding="utf-8").read()
                bad += [f for marker in MARKERS if marker in text]
    assert not bad, bad
