"""The test suite itself: no test module or conftest changes the process environment when imported.

An import-time ``os.environ[...] = ...`` (or ``setdefault``) leaks into every test collected after it; with
``TRITON_INTERPRET`` it silently turned the gpu marker's kernels into interpreted ones.  tests/conftest.py is
the one place that sets the interpreter, in a hook, and only without CUDA.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import importlib.util, json, os, sys
    sys.path.insert(0, sys.argv[1])
    changed, failed = {}, {}
    for i, path in enumerate(sys.argv[2:]):
        before = dict(os.environ)
        spec = importlib.util.spec_from_file_location(f"hygiene_probe_{i}", path)
        try:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        except BaseException as error:          # pytest.importorskip's Skipped is fine: the import still ran
            if type(error).__name__ != "Skipped":
                failed[os.path.relpath(path, sys.argv[1])] = repr(error)
        after = dict(os.environ)
        diff = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        if diff:
            changed[os.path.relpath(path, sys.argv[1])] = diff
    print(json.dumps(dict(changed=changed, failed=failed)))
""")


def test_no_test_module_changes_the_environment_at_import():
    files = sorted(str(p) for folder in ("tests", "bench") for p in (ROOT / folder).rglob("*.py"))
    assert any(f.endswith("test_buckets.py") for f in files)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # a setdefault would show
    result = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), *files], capture_output=True, text=True,
                            env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["failed"], f"modules that failed to import: {report['failed']}"
    assert not report["changed"], f"modules that change os.environ at import (module: variables): {report['changed']}"
