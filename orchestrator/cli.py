"""The ``orchestrator`` command.

    orchestrator launch CONFIG [--set KEY=VALUE]... [--run-dir DIR] [--prediction PREDICTION.json]
                       [-- SCRIPT [ARGS...] | -- -m MODULE [ARGS...]]
    orchestrator validate CONFIG [--set KEY=VALUE]...
    orchestrator network [CONFIG] [--set KEY=VALUE]... [--sysfs-root DIR] [--head ADDR]
    orchestrator dev-cluster up --nodes N [--cpus-per-node C] [--json] | down NAME
                             | kill-node NAME INDEX | partition NAME INDEX
    orchestrator scaling plan CONFIG [--set KEY=VALUE]... --out PLAN.json [--sweep-compute-fraction F]
                       | run PLAN.json [--target] | fit PLAN.json [--out PREDICTION.json]

Exit codes: 0 trained to the end, 1 the run failed, 2 bad input (nothing
was started), 3 preempted (SIGTERM or SIGUSR1, as a scheduler sends them: a
checkpoint taken where the training code can, every rank stopped; the same
command resumes), 130 interrupted by Ctrl-C after a clean stop.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config import Config, load_config
from orchestrator.errors import ClusterError, ConfigError
from orchestrator.worker import script

if TYPE_CHECKING:
    from orchestrator.controller.states import Failed

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PREEMPTED = 0, 1, 2, 3
# What a scheduler sends to stop a job (Slurm: SIGTERM on scancel and preemption; the warning of
# `sbatch --signal=B:USR1@90`): the run saves and ends preempted.
PREEMPTING_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
RESUME_COMMAND_ENV = "ORCH_RESUME_COMMAND"  # set by a launcher (launch/slurm/job.py): the command that resumes


class Interrupted(Exception):
    """The user asked the run to stop (SIGINT or SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` is the user's command line, untouched by our parser.
    command = argv[argv.index("--") + 1:] if "--" in argv else None
    args = parser.parse_args(argv[:argv.index("--")] if command is not None else argv)
    args.program = command
    args.argv = argv
    try:
        if command is not None and args.command != "launch" and args.command != "validate":
            raise ConfigError(f"{args.command}: `-- SCRIPT ARGS` is for launch and validate only")
        return args.func(args)
    except ConfigError as exc:
        print(f"orchestrator: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="YAML config file, e.g. cluster_configs/local.yaml")
        p.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE",
            help="override a config key, e.g. --set train.steps=300 (repeatable)",
        )

    launch = sub.add_parser("launch", help="run a training job to completion")
    add_config_args(launch)
    launch.add_argument("--run-dir", help="run directory; re-using one resumes its latest checkpoint")
    launch.add_argument(
        "--inject-fault", action="append", default=[], metavar="KIND@RANK:STEP",
        help="rehearse a failure: KIND (kill, hang, raise, exit) in rank RANK right after it reports "
        "step STEP, once per run, e.g. kill@1:30 (repeatable)",
    )
    launch.add_argument("--prediction", metavar="PREDICTION.json",
                        help="a scaling prediction for this run (orchestrator scaling fit): exported beside its "
                        "held-out loss for dashboards and alerts (docs/scaling.md)")
    launch.set_defaults(func=_launch)

    validate = sub.add_parser("validate", help="check a config without starting anything")
    add_config_args(validate)
    validate.set_defaults(func=_validate)

    network = sub.add_parser(
        "network", help="print, as JSON, the network variables this node's ranks would get",
        description="Detect this node's network per cluster.network (interface, InfiniBand/RoCE adapters, GID "
        "index) and print the variables a rank here would get, as JSON. Without CONFIG: the defaults with "
        "cluster.device=gpu.",
    )
    network.add_argument("config", nargs="?", help="YAML config file (default: the defaults, on GPU)")
    network.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    network.add_argument("--sysfs-root", default="/sys", metavar="DIR",
                         help="read devices from DIR/class/... instead of /sys (default: /sys)")
    network.add_argument("--head", metavar="ADDR",
                         help="the head node's address (default: the host of cluster.ray_address, else 127.0.0.1)")
    network.set_defaults(func=_network)

    dev = sub.add_parser("dev-cluster", help="a multi-node Ray cluster on this machine, one network namespace per node")
    dev_sub = dev.add_subparsers(dest="action", required=True, metavar="ACTION")
    dev_up = dev_sub.add_parser("up", help="start a head and N nodes; prints the cluster.ray_address to use")
    dev_up.add_argument("--nodes", type=int, required=True, help="worker nodes (each its own namespace and address)")
    dev_up.add_argument("--cpus-per-node", type=int, default=2, help="CPUs each node offers Ray (default: 2)")
    dev_up.add_argument("--json", action="store_true", help="print one JSON object: name, address, nodes")
    dev_down = dev_sub.add_parser("down", help="remove every process, namespace and bridge of a dev cluster")
    dev_down.add_argument("name")
    for action, text in (("kill-node", "SIGKILL every process of node INDEX (a lost node)"),
                         ("partition", "cut node INDEX off the others; its processes keep running")):
        p = dev_sub.add_parser(action, help=text)
        p.add_argument("name")
        p.add_argument("index", type=int, help="the node's index in `up`'s list of nodes")
    dev.set_defaults(func=_dev_cluster)

    checkpoints = sub.add_parser("checkpoints", help="list or verify a run directory's checkpoints")
    checkpoints.add_argument("action", choices=["list", "verify"],
                             help="list: sizes checked (fast); verify: every file's checksum too")
    checkpoints.add_argument("run_dir", metavar="RUN_DIR")
    checkpoints.set_defaults(func=_checkpoints)

    scaling = sub.add_parser("scaling", help="predict a big run's loss from a sweep of small ones (docs/scaling.md)")
    scaling_sub = scaling.add_subparsers(dest="action", required=True, metavar="ACTION")
    plan = scaling_sub.add_parser("plan", help="plan the sweep for a target config; print it and write PLAN.json")
    add_config_args(plan)
    plan.add_argument("--sweep-compute-fraction", type=float, default=0.01, metavar="F",
                      help="the whole sweep costs at most F of the target's compute (default: 0.01)")
    plan.add_argument("--runs", type=int, default=6, help="sweep runs (default: 6)")
    plan.add_argument("--span", type=float, default=100.0,
                      help="compute of the largest sweep run over the smallest (default: 100, at least 100)")
    plan.add_argument("--compute", default="6ND", choices=["6ND", "6ND+attention"],
                      help="how compute is counted (default: 6ND, N non-embedding parameters, D tokens)")
    plan.add_argument("--out", required=True, metavar="PLAN.json", help="where to write the plan")
    run = scaling_sub.add_parser("run", help="run a plan's sweep (skips finished runs, resumes interrupted ones)")
    run.add_argument("plan", metavar="PLAN.json")
    run.add_argument("--parallel", type=int, default=0,
                     help="runs at once (default: as many as this machine's cores hold, at least 1)")
    run.add_argument("--target", action="store_true", help="also run the target itself, after the sweep")
    fit = scaling_sub.add_parser("fit", help="fit the sweep, predict the target; write PREDICTION.json and a PNG")
    fit.add_argument("plan", metavar="PLAN.json")
    fit.add_argument("--out", metavar="PREDICTION.json", help="default: PLAN-prediction.json next to the plan")
    fit.add_argument("--plot", metavar="PNG", help="default: PLAN-prediction.png next to the plan")
    fit.add_argument("--exclude", action="append", default=[], metavar="RUN", help="leave a run out of the fit")
    fit.add_argument("--bootstrap", type=int, default=200, metavar="N", help="bootstrap draws (default: 200)")
    scaling.set_defaults(func=_scaling)

    metrics = sub.add_parser("metrics", help="print a run's Prometheus endpoint and a scrape config for it")
    metrics.add_argument("run_dir", metavar="RUN_DIR")
    metrics.set_defaults(func=_metrics)
    return parser


def _scaling(args: argparse.Namespace) -> int:
    """plan: 0; run: 0 when every run finished, 1 otherwise; fit: 0."""
    from orchestrator.scaling import plan as planning

    if args.action == "plan":
        plan = planning.make_plan(args.config, args.set, fraction=args.sweep_compute_fraction, runs=args.runs,
                                  span=args.span, compute=args.compute)
        Path(args.out).write_text(plan.to_json())
        _print_plan(plan)
        print(f"plan written to {args.out}; next: orchestrator scaling run {args.out}")
        return EXIT_OK
    plan_path = Path(args.plan)
    plan = planning.Plan.load(plan_path)
    if args.action == "run":
        from orchestrator.scaling.sweep import run_sweep

        world = plan.run_config(plan.target).cluster.world_size
        parallel = args.parallel or max(1, (os.cpu_count() or 1) // world)
        with _signals_interrupt():
            try:
                failed = run_sweep(plan, plan_path, parallel=parallel, include_target=args.target)
            except Interrupted as exc:
                print(f"{exc}: the sweep's launches stopped and kept their checkpoints; run "
                      f"`orchestrator scaling run {plan_path}` again to resume them", file=sys.stderr)
                return 128 + exc.signum
        return EXIT_FAILED if failed else EXIT_OK
    from orchestrator.scaling import predict
    from orchestrator.scaling.plot import plot
    from orchestrator.scaling.sweep import prediction_path

    doc = predict.predict(plan, plan_path, exclude=tuple(args.exclude), samples=args.bootstrap)
    out = Path(args.out) if args.out else prediction_path(plan_path)
    png = Path(args.plot or out.with_suffix(".png"))
    predict.write(doc, out)
    plot(doc, png)
    law, (low, high) = doc["compute_law"], doc["prediction"]["interval"]
    print(f"L(C) = {law['a']:.4g} * C^{law['b']:.4f} + {law['c']:.4f}")
    if isinstance(doc["size_data_law"], dict) and "E" in doc["size_data_law"]:
        sd = doc["size_data_law"]
        print(f"L(N, D) = {sd['E']:.4f} + {sd['A']:.4g}/N^{sd['alpha']:.3f} + {sd['B']:.4g}/D^{sd['beta']:.3f}: "
              f"target {sd['final_loss']:.4f} ({sd['interval'][0]:.4f}-{sd['interval'][1]:.4f})")
    print(f"target (C = {doc['target']['compute_flops']:.3g} FLOPs): predicted held-out loss "
          f"{doc['prediction']['final_loss']:.4f}, {doc['level']:.0%} interval {low:.4f}-{high:.4f}")
    _print_backtest(doc)
    if "actual" in doc:
        actual = doc["actual"]["final_loss"]
        inside = "inside" if low <= actual <= high else "OUTSIDE"
        print(f"target actual: {actual:.4f}; relative error {(doc['prediction']['final_loss'] - actual) / actual:+.2%}; "
              f"{inside} the interval")
    print(f"written: {out}, {png}")
    return EXIT_OK


def _print_backtest(doc: dict[str, Any]) -> None:
    test = doc["backtest"]
    if "error" in test:
        print(f"warning: no backtest (L(C) without the largest run cannot be fitted: {test['error']}); "
              f"the prediction is not to be trusted", file=sys.stderr)
        return
    further = doc["target"]["compute_flops"] / test["compute"]
    print(f"backtest: L(C) without {test['run']} predicts it at {test['predicted']:.4f}; it measured "
          f"{test['actual']:.4f} ({test['relative_error']:+.2%}); the target is {further:.0f}x further")
    if not test["passed"]:
        trend = "falling faster than" if test["relative_error"] > 0 else "falling slower than"
        print(f"warning: the sweep's losses are {trend} its own law (backtest off by more than "
              f"{test['tolerance']:.0%}) and the target is {further:.0f}x further: do not trust the prediction; "
              f"the sweep's runs are too small for this target (docs/scaling.md, 'The backtest')", file=sys.stderr)


def _print_plan(plan: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep for {plan.config} ({plan.compute})")
    for column in ("run", "layers", "dim", "steps", "params N", "tokens D", "compute C", "C / target"):
        table.add_column(column, justify="right")
    for run in [*plan.runs, plan.target]:
        config = plan.run_config(run)
        table.add_row(run.name, str(config.model.layers), str(config.model.dim), str(config.train.steps),
                      f"{run.params:,}", f"{run.tokens:,}", f"{run.compute_flops:.3g}",
                      f"{run.compute_flops / plan.target.compute_flops:.2e}")
    Console().print(table)
    print(f"sweep total: {plan.sweep_compute:.3g} FLOPs = {plan.sweep_compute / plan.target.compute_flops:.4f} of the "
          f"target (at most {plan.sweep_compute_fraction:g}); span "
          f"{plan.runs[-1].compute_flops / plan.runs[0].compute_flops:.0f}x")


def _checkpoints(args: argparse.Namespace) -> int:
    """Exit 0 when every committed checkpoint is valid, 1 when one is damaged."""
    from orchestrator.checkpoint import report

    checksums = args.action == "verify"
    entries = report.inspect(Path(args.run_dir), checksums=checksums)
    sys.stdout.write(report.render(entries, checksums))
    return EXIT_FAILED if any(e.status == "damaged" for e in entries) else EXIT_OK


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config, [*args.set, *_program_overrides(args.program)])
    _import_from_launch_dir()
    _check_entrypoint(config)
    script.check(config.train, Path.cwd())
    if config.train.script is not None:
        # Every rank (and the zygote that imports for them) finds it whatever its working directory.
        config = config.model_copy(update={"train": config.train.model_copy(
            update={"script": str(Path(config.train.script).absolute())})})
    return config


def _program_overrides(command: list[str] | None) -> list[str]:
    """``-- script.py ARGS`` or ``-- -m module ARGS`` as config overrides (train.script or train.module, train.args)."""
    if command is None:
        return []
    if not command or command == ["-m"]:
        raise ConfigError("launch: nothing after `--`; give a script and its arguments (`-- train.py --lr 3e-4`) "
                          "or a module (`-- -m package.train`)")
    import json

    if command[0] == "-m":
        program, args = [f"train.module={json.dumps(command[1])}", "train.script=null"], command[2:]
    elif command[0].startswith("-"):
        raise ConfigError(f"launch: after `--` comes a script or `-m MODULE`, not the option {command[0]!r}")
    else:
        program, args = [f"train.script={json.dumps(command[0])}", "train.module=null"], command[1:]
    return [*program, f"train.args={json.dumps(args)}", "train.entrypoint=null"]


def _import_from_launch_dir() -> None:
    """User entry points resolve from the launch directory, here and (via PYTHONPATH) in every rank.

    Appended, not put first: a stray ``torch.py`` in the launch directory must not shadow torch."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if cwd not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([*paths, cwd])


def _check_entrypoint(config: Config) -> None:
    """Fail before anything starts when the user's training module cannot be found."""
    if config.train.entrypoint is None:
        return
    module = config.train.entrypoint.partition(":")[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise ConfigError(
            f"train.entrypoint: module {module!r} is not importable; install it or add its "
            "directory to PYTHONPATH"
        )
    function = config.train.entrypoint.partition(":")[2]
    defined = _defines(module, function)
    if defined is not None and not defined[0]:
        raise ConfigError(
            f"train.entrypoint: module {module!r} defines no {function!r} "
            f"(its functions: {', '.join(defined[1]) or 'none'}); fix the name after the colon"
        )


def _defines(module: str, name: str) -> tuple[bool, list[str]] | None:
    """Whether ``module`` defines ``name``, and its top-level functions; None when that cannot be
    known. The standard library is imported (cheap, no side effects); the user's code is read, not
    imported: the controller must not run it."""
    import ast
    import inspect

    if module.partition(".")[0] in sys.stdlib_module_names:
        imported = importlib.import_module(module)
        routines = [n for n in dir(imported) if not n.startswith("_") and inspect.isroutine(getattr(imported, n))]
        return hasattr(imported, name), routines[:12] + (["..."] if len(routines) > 12 else [])
    origin = importlib.util.find_spec(module).origin
    if not origin or not origin.endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(origin).read_bytes(), origin)
    except OSError as exc:
        raise ConfigError(f"train.entrypoint: cannot read {origin}: {exc.strerror}; check its permissions") from None
    except SyntaxError as exc:
        raise ConfigError(
            f"train.entrypoint: {origin}, line {exc.lineno}: {exc.msg}; fix the syntax error"
        ) from None
    except ValueError:
        return None  # e.g. a NUL byte: the rank reports it with its traceback
    # Every name bound anywhere in the file (function bodies too): generous, so that a name bound
    # under `if`/`try` is never reported missing; what it catches is a name that appears nowhere.
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.alias):
            if node.name == "*":
                return None
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    if "__getattr__" in names:
        return None
    functions = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return name in names, functions


def _validate(args: argparse.Namespace) -> int:
    config = _load(args)
    print(f"config OK: {_describe(config)}")
    return EXIT_OK


def _describe(config: Config) -> str:
    """The job in one line: the world and what it runs (the built-in workload's own settings only for it)."""
    cluster = config.cluster
    world = f"{cluster.world_size} ranks ({cluster.nodes} node(s) x {cluster.workers_per_node}), {cluster.device}"
    if config.train.is_builtin:
        return (f"{world}, built-in GPT, ZeRO-{config.parallel.zero_stage}, tensor parallel "
                f"{config.parallel.tensor_parallel}, {config.train.steps} steps")
    kind = "entry point" if config.train.entrypoint else "script" if config.train.script else "module"
    return f"{world}, {kind} {config.train.describe()}"


def _network(args: argparse.Namespace) -> int:
    """Print the variables ``worker/network.py`` would give ranks on this node; details on stderr."""
    import json

    from orchestrator.worker.network import configure

    if not Path(args.sysfs_root).is_dir():
        raise ConfigError(f"--sysfs-root {args.sysfs_root}: no such directory (give the root of a sysfs tree, "
                          "e.g. /sys, or a copy of one)")
    overrides = args.set if args.config else ["cluster.device=gpu", *args.set]
    config = load_config(args.config, overrides)
    head = args.head or _head_host(config.cluster.ray_address)
    found = configure(config, head, args.sysfs_root)
    print(f"head {head}: {found.summary()}", file=sys.stderr)
    print(json.dumps(found.env, indent=2, sort_keys=True))
    return EXIT_OK


def _dev_cluster(args: argparse.Namespace) -> int:
    """``dev-cluster up|down|kill-node|partition``; a cluster that cannot be made exits 1."""
    import json

    from orchestrator import devcluster

    try:
        if args.action == "up":
            if args.nodes < 1 or args.cpus_per_node < 1:
                raise ConfigError("dev-cluster up: --nodes and --cpus-per-node must be at least 1")
            cluster = devcluster.up(args.nodes, args.cpus_per_node)
            if args.json:
                print(json.dumps(cluster.summary()))
            else:
                print(f"dev cluster {cluster.name}: head {cluster.address}")
                for node in cluster.nodes:
                    print(f"  node {node.index}: {node.address} ({args.cpus_per_node} CPUs)")
                print(f"use: --set cluster.ray_address={cluster.address} --set cluster.nodes=N")
                print(f"stop: orchestrator dev-cluster down {cluster.name}")
        elif args.action == "down":
            killed = devcluster.down(args.name)
            print(f"dev cluster {args.name} removed: {len(killed)} processes stopped, its namespaces, bridge and "
                  "state deleted")
        elif args.action == "kill-node":
            pids = devcluster.kill_node(args.name, args.index)
            print(f"node {args.index}: killed {len(pids)} processes")
        else:
            devcluster.partition(args.name, args.index)
            print(f"node {args.index}: cut off (its processes keep running)")
    except ClusterError as exc:
        print(f"orchestrator: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _head_host(ray_address: str | None) -> str:
    """The host part of ``HOST:PORT`` (or ``ray://HOST:PORT``); loopback for the embedded Ray or ``auto``."""
    if ray_address is None or ray_address == "auto":
        return "127.0.0.1"
    return ray_address.removeprefix("ray://").rpartition(":")[0] or "127.0.0.1"


def parse_fault(text: str, world_size: int) -> dict[str, Any]:
    """``KIND@RANK:STEP`` -> ``{"kind", "rank", "step"}``; a malformed one is a user error."""
    from orchestrator.worker.faults import FAULT_KINDS

    kind, _, where = text.partition("@")
    rank, _, step = where.partition(":")
    if kind not in FAULT_KINDS or not rank.isdigit() or not step.isdigit():
        raise ConfigError(
            f"--inject-fault {text!r}: expected KIND@RANK:STEP with KIND one of {', '.join(FAULT_KINDS)}, "
            "e.g. kill@1:30"
        )
    if int(rank) >= world_size or int(step) < 1:
        raise ConfigError(f"--inject-fault {text!r}: rank must be below the world size {world_size}, step at least 1")
    return {"kind": kind, "rank": int(rank), "step": int(step)}


def _launch(args: argparse.Namespace) -> int:
    config = _load(args)
    if config.cluster.device == "cpu":
        from orchestrator.installation import cpu_op_problem

        problem = cpu_op_problem()
        if problem is not None:
            raise ConfigError(problem)
    crowded = None
    if config.cluster.ray_address is None:  # local mode: this machine is the node
        from orchestrator.controller import capacity

        crowded = capacity.check(config, capacity.NodeCapacity.of_this_machine())
    faults = [parse_fault(item, config.cluster.world_size) for item in args.inject_fault]
    prediction = None
    if args.prediction is not None:
        from orchestrator.scaling.predict import for_run

        if not config.metrics.enabled:
            raise ConfigError("--prediction: the prediction is watched on the metrics endpoint; set metrics.enabled=true")
        prediction = for_run(Path(args.prediction), config)
    from orchestrator.controller.controller import Controller
    from orchestrator.controller.reaper import Reaper
    from orchestrator.controller.states import Failed, Preempted
    from orchestrator.controller.worker_group import RayWorkerGroup
    from orchestrator.events import MetricsStarted
    from orchestrator.monitor.gpu_endpoint import GPU_TARGETS, TargetsFile, is_loopback
    from orchestrator.monitor.progress import make_progress
    from orchestrator.run_dir import RunDir

    # The run directory first: a second launch on it is told who holds it, not that the port is taken.
    run = RunDir.open(args.run_dir)
    run.lock()
    server = None
    try:
        metrics, server = _serve_metrics(config, prediction)
        events = _open_events(run.events)
    except ConfigError:
        if server is not None:
            server.close()
        run.discard()
        raise
    reaper = Reaper()  # from here on, nothing this run starts can outlive it
    display = make_progress()
    if crowded is not None:
        display.note(f"warning: {crowded}")
    if server is not None:
        events.emit(MetricsStarted(url=server.url, target=server.target))
        display.note(f"metrics: {server.url}")
        if config.cluster.ray_address is not None and is_loopback(config.metrics.host):
            display.note(f"metrics: each node's GPU endpoint listens on that node's loopback (metrics.host "
                         f"{config.metrics.host}), so Prometheus here finds this machine's only; to scrape every "
                         "node set metrics.host to this node's address (each node's endpoint then listens on its "
                         "own) and restrict access: the endpoints have no authentication")
    group = RayWorkerGroup(config, run.path, run_id=run.run_id)
    targets = TargetsFile(run.path / GPU_TARGETS, run.run_id) if metrics is not None else None
    controller = Controller(config, run, group, events, display, faults=faults, metrics=metrics, gpu_targets=targets)
    display.note(f"run {run.run_id}: {_describe(config)} -> {run.path}")
    started = time.monotonic()
    interrupted: Interrupted | None = None
    try:
        with _signals_interrupt(signals=(signal.SIGINT,)), _signals_preempt(controller):
            try:
                state = controller.run()
            except Interrupted as exc:
                display.note(f"{exc}: stopping every rank...")
                controller.abort("interrupted")
                state, interrupted = controller.state, exc
            except ConfigError as exc:
                controller.abort("config_error", str(exc))
                raise
            except ClusterError as exc:
                controller.abort("cluster_error", str(exc))
                print(f"orchestrator: {exc}", file=sys.stderr)
                return EXIT_FAILED
            except Exception as exc:
                controller.abort("controller_error", f"{type(exc).__name__}: {exc}")
                raise
            finally:
                # Cleanup is bounded by timeouts; a second Ctrl-C or a SIGTERM must not cut it short.
                for sig in (signal.SIGINT, *PREEMPTING_SIGNALS):
                    signal.signal(sig, signal.SIG_IGN)
                group.close()
                display.close()
    finally:
        if server is not None:
            server.close()
        if targets is not None:
            targets.update([])  # the agents' endpoints closed with them
        events.close()
        reaper.release()
    if isinstance(state, Failed):
        _print_failure(state)
        return EXIT_FAILED
    if interrupted is not None or isinstance(state, Preempted):
        print(f"stopped at step {controller.last_step or 0}; last checkpoint: {controller.last_checkpoint or 'none'}; "
              f"resume with: {_resume_command(args.argv, run.path)}")
        return 128 + interrupted.signum if interrupted is not None else EXIT_PREEMPTED
    elapsed = time.monotonic() - started
    print(f"succeeded: {_summary(controller.last_step, controller.last_loss)}, {elapsed:.1f}s, run dir {run.path}")
    return EXIT_OK


def _resume_command(argv: list[str], run_dir: Path) -> str:
    """The launch command line again, with the run directory it used (given or made); what its launcher
    says resumes it, where one started it (``RESUME_COMMAND_ENV``: the Slurm job's ``sbatch``)."""
    if os.environ.get(RESUME_COMMAND_ENV):
        return os.environ[RESUME_COMMAND_ENV]
    ours = argv[:argv.index("--")] if "--" in argv else argv
    if "--run-dir" not in ours and not any(a.startswith("--run-dir=") for a in ours):
        argv = [*ours, "--run-dir", str(run_dir), *argv[len(ours):]]
    return shlex.join(["orchestrator", *argv])


def _summary(step: int | None, loss: float | None) -> str:
    """The last step and loss reported, or that none were."""
    if step is None:
        return "no steps were reported (add orchestrator.report or the Hugging Face callback: docs/scripts.md)"
    return f"step {step}, " + (f"final loss {loss:.4f}" if loss is not None else "no loss reported")


def _open_events(path: Path) -> Any:
    """The run's event log, opened for appending; a path that is not a plain file is a user error."""
    from orchestrator.events import EventLog

    try:
        return EventLog(path)
    except OSError as exc:
        raise ConfigError(
            f"--run-dir {path.parent}: cannot append to {path} ({exc.strerror or exc}; it must be a regular "
            "file, not a directory or a symlink); move it aside or give another --run-dir"
        ) from None


def _serve_metrics(config: Config, prediction: dict[str, Any] | None) -> tuple[Any, Any]:
    """The run's metrics and its endpoint, bound before anything starts so a taken port fails fast."""
    if not config.metrics.enabled:
        return None, None
    from orchestrator.monitor.exporter import MetricsServer
    from orchestrator.monitor.metrics import JobMetrics

    metrics = JobMetrics(prediction=prediction, per_rank_limit=config.metrics.per_rank_limit)
    return metrics, MetricsServer(metrics.registry, config.metrics.host, config.metrics.port)


def _metrics(args: argparse.Namespace) -> int:
    """Print a run's metrics endpoint and a Prometheus scrape config for it."""
    from orchestrator.events import MetricsStarted, RunFinished, read_typed
    from orchestrator.monitor.exporter import scrape_config
    from orchestrator.monitor.gpu_endpoint import GPU_TARGETS
    from orchestrator.run_dir import RunDir

    path = Path(args.run_dir)
    if not (path / "events.jsonl").exists():
        raise ConfigError(f"RUN_DIR {path}: no events.jsonl; is it a run directory?")
    evs = read_typed(path / "events.jsonl")
    started = [e for e in evs if isinstance(e, MetricsStarted)]
    if not started:
        raise ConfigError(f"RUN_DIR {path}: this run never served metrics (metrics.enabled=false?)")
    last = started[-1]
    running = not any(isinstance(e, RunFinished) and e.ts >= last.ts for e in evs)
    print(f"endpoint: {last.url} ({'running' if running else 'run finished; endpoint closed'})")
    print(scrape_config(last.target, RunDir.read_id(path), path / GPU_TARGETS), end="")
    return EXIT_OK


def _print_failure(state: Failed) -> None:
    """The root cause with its traceback (or log tail) once, then the other ranks' failures, merged."""
    from orchestrator.controller.failures import root_cause

    cause = root_cause(state.failures)
    same = sorted(f.rank for f in state.failures if f is not cause and f.message == cause.message)
    out = sys.stderr
    out.write(f"\nrun failed: rank {cause.rank}: {cause.message}\n")
    if same:
        out.write(f"(the same error on rank{'s' if len(same) > 1 else ''} {', '.join(map(str, same))})\n")
    if cause.details():
        out.write(f"--- rank {cause.rank} ---\n{cause.details().rstrip()}\n---\n")
    for other in state.failures:
        if other is not cause and other.rank not in same:
            out.write(f"(then rank {other.rank}: {other.message})\n")
    if state.reason:
        out.write(f"{state.reason}\n")
    out.flush()


@contextmanager
def _signals_interrupt(signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Turn ``signals`` into :class:`Interrupted` in the main thread."""

    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    with _handling(signals, handler):
        yield


@contextmanager
def _signals_preempt(controller: Any) -> Iterator[None]:
    """Turn a scheduler's stop (:data:`PREEMPTING_SIGNALS`) into a preemption the controller carries
    out between two of its steps (a checkpoint, then every rank stopped)."""

    def handler(signum: int, _frame: object) -> None:
        controller.request_preemption(signal.Signals(signum).name)

    with _handling(PREEMPTING_SIGNALS, handler):
        yield


@contextmanager
def _handling(signals: tuple[signal.Signals, ...], handler: Any) -> Iterator[None]:
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
