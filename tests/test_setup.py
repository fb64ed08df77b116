"""Packaging: a non-editable install must carry every subpackage (setup.py lists them by hand)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_keywords() -> dict:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("packages", "package_dir")}


def test_every_subpackage_is_listed():
    kw = setup_keywords()
    found = set()
    for folder, dirs, files in os.walk(os.path.join(ROOT, "text2ct_engine")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if "__init__.py" in files:
            found.add(os.path.relpath(folder, ROOT).replace(os.sep, "."))
    assert found <= set(kw["packages"]), sorted(found - set(kw["packages"]))
    for package, folder in kw["package_dir"].items():  # the top-level folders installed under the package
        assert package in kw["packages"] and os.path.isfile(os.path.join(ROOT, folder, "__init__.py"))
