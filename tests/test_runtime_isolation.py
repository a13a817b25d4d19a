"""The runtime is what a Jetson board or a desktop app installs: it must never pull in torch."""
import json
import subprocess
import sys

SCRIPT = """
import json, sys
from dflash_edge.runtime import load
model = load(sys.argv[1])
result = model.generate("hello world", max_new_tokens=8)
heavy = sorted(m for m in ("torch", "transformers", "optimum", "onnx", "jinja2") if m in sys.modules)
print(json.dumps({"heavy": heavy, "tokens": len(result.token_ids)}))
"""


def test_loading_and_generating_imports_no_torch(tiny_llama):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_llama[2])], capture_output=True, text=True,
                         check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert report["tokens"] >= 1


def test_runtime_sources_import_only_the_allowed_packages():
    import ast
    from pathlib import Path

    import dflash_edge

    allowed = {"numpy", "onnxruntime", "tokenizers", "dflash_edge"}
    root = Path(dflash_edge.__file__).parent
    files = list((root / "runtime").glob("*.py")) + [root / "manifest.py", root / "errors.py", root / "__init__.py"]
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or top in sys.stdlib_module_names, f"{f.name} imports {name}"
