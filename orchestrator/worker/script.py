"""Run a user's script (``train.script``) or module (``train.module``) as ``__main__``, unmodified.

What ``python script.py ARGS`` and ``python -m MODULE ARGS`` do, inside a rank's process: the same
``sys.argv``, ``sys.path[0]`` and ``__main__``, and the same exit status (``sys.exit`` included).
torchrun's environment contract is already in the process's environment (``worker/env.py``).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import runpy
import sys
from pathlib import Path

from orchestrator.config.schema import TrainConfig
from orchestrator.errors import ConfigError


def run(train: TrainConfig) -> int:
    """Run the script or module to its end; its exit status (0, or what it gave ``sys.exit``)."""
    try:
        if train.script is not None:
            path = os.path.abspath(train.script)
            sys.argv = [path, *train.args]
            sys.path.insert(0, os.path.dirname(path))
            runpy.run_path(path, run_name="__main__")
        else:
            sys.argv = [train.module, *train.args]  # runpy puts the module's file in argv[0]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(train.module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exit_status(exc)
    return 0


def exit_status(exc: SystemExit) -> int:
    """The exit status ``sys.exit(arg)`` gives, printing a non-integer ``arg`` as Python does."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr, flush=True)
    return 1


def check(train: TrainConfig, launch_dir: Path) -> None:
    """Fail before anything starts when the script cannot run: missing, unreadable, a syntax error,
    or a module that is not importable. The script is read, never run, here."""
    if train.script is not None:
        path = launch_dir / train.script
        if not path.is_file():
            raise ConfigError(f"train.script: {path} is not a file; give the path of your training script")
        try:
            source = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"train.script: cannot read {path}: {exc.strerror}; check its permissions") from None
        try:
            ast.parse(source, str(path))
        except SyntaxError as exc:
            raise ConfigError(f"train.script: {path}, line {exc.lineno}: {exc.msg}; fix the syntax error") from None
        except ValueError as exc:
            raise ConfigError(f"train.script: {path} is not Python source ({exc})") from None
    elif train.module is not None:
        try:
            found = importlib.util.find_spec(train.module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise ConfigError(f"train.module: {train.module!r} is not importable; install it or run from the "
                              "directory that contains it")


def third_party_imports(train: TrainConfig) -> list[tuple[str, list[str]]]:
    """What a script imports at its top level from packages outside its own directory, as (module,
    names) pairs (``import transformers`` -> ("transformers", []); ``from transformers import Trainer``
    -> ("transformers", ["Trainer"])): what a node's zygote can import once for every process it forks.
    Installed packages and those on ``PYTHONPATH`` count; the script's own modules (beside it) and the
    standard library are left out."""
    if train.script is None:
        return []
    path = Path(train.script)
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (OSError, SyntaxError, ValueError):
        return []
    wanted: list[tuple[str, list[str]]] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            wanted += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            wanted.append((node.module, [alias.name for alias in node.names if alias.name != "*"]))
    local = path.resolve().parent
    installed: dict[str, bool] = {}
    found = []
    for module, names in wanted:
        top = module.partition(".")[0]
        if top not in installed:
            installed[top] = _is_installed(top, local)
        if installed[top]:
            found.append((module, names))
    return found


def _is_installed(top: str, local: Path) -> bool:
    if top in sys.stdlib_module_names or top == "orchestrator":
        return False
    if (local / top).exists() or (local / f"{top}.py").exists():
        return False  # the script's own module: importing it could run anything
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None or spec.origin is None or not os.path.isabs(spec.origin):
        return False  # a namespace package, or a built-in module
    return not Path(spec.origin).resolve().is_relative_to(local)


def preimport(train: TrainConfig) -> None:
    """Import what :func:`third_party_imports` finds; what fails to import is left to the script."""
    for module, names in third_party_imports(train):
        try:
            imported = importlib.import_module(module)
            for name in names:
                getattr(imported, name, None)  # a lazy package (transformers) imports the name's module now
        except Exception:  # noqa: BLE001 - the script will import it itself, and report what fails
            continue
