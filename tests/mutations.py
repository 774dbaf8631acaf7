"""Mutation sweep: does the test suite fail when the code under test breaks?

Each mutation replaces one exact snippet of one file with a broken version. The sweep copies the
working tree into a temporary directory, applies one mutation at a time there (the real files are
never touched), runs the named test files with `-x -q` and prints whether the suite caught it and
by which test. A snippet no longer in the code (after a refactor) is reported as "snippet missing"
and, like a mutation that survives, makes the sweep exit 1: update the snippet, then re-run.

    PYTHONPATH=$PWD python tests/mutations.py            # every mutation
    PYTHONPATH=$PWD python tests/mutations.py -k greedy  # those whose name contains "greedy"
    PYTHONPATH=$PWD python tests/mutations.py --list

Not collected by pytest (the name does not start with `test_`). Exit status 1 if any present
mutation survived.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info",
                                "build", "dist", "out", "report", "demo-out")


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once
    replacement: str
    tests: tuple[str, ...]  # test files to run
    breaks: str  # what the mutation breaks, in words
    elsewhere: tuple[tuple[str, str, str], ...] = ()  # (file, original, replacement) where the code may move

    def sites(self):
        return ((self.file, self.original, self.replacement), *self.elsewhere)


MUTATIONS = [
    # --- cost models ---------------------------------------------------------------------------
    Mutation("apportion-off-by-one", "cost_models/routing.py",
             "    base += rank < left[:, None]\n", "    base += rank <= left[:, None]\n",
             ("tests/test_routing.py",), "largest-remainder rounding hands out one token too many"),
    Mutation("route-table-ignores-shares", "cost_models/routing.py",
             "    sh = np.where(valid, np.take_along_axis(share, cols, axis=1), 0.0)\n",
             "    sh = np.where(valid, 1.0, 0.0)\n",
             ("tests/test_routing.py",), "whole-token routing splits every expert evenly over its replicas"),
    Mutation("route-ignores-shares", "cost_models/routing.py",
             "    cap = counts.sum(axis=0)[:, None] * share  # the demand",
             "    cap = counts.sum(axis=0)[:, None] * (share > 0) / np.maximum((share > 0).sum(axis=1, "
             "keepdims=True), 1)  # the demand",
             ("tests/test_routing.py", "tests/test_estimator.py"),
             "the estimator's fractional routing splits every expert evenly"),
    Mutation("estimator-drops-sync", "cost_models/estimator.py",
             "compute + a2a + sync)", "compute + a2a)",
             ("tests/test_estimator.py",), "step time leaves out replica synchronisation"),
    Mutation("lower-bound-too-high", "cost_models/estimator.py",
             "    return float((tokens + experts * (a / b).min()) / (1.0 / b).sum())\n",
             "    return 1.5 * float((tokens + experts * (a / b).min()) / (1.0 / b).sum())\n",
             ("tests/test_estimator.py",), "the estimator's lower bound exceeds real step times"),
    Mutation("migration-costs-nothing", "cost_models/estimator.py",
             "    return float((np.maximum(si, ri) + np.maximum(so, ro) + latency).max())\n",
             "    return 0.0\n",
             ("tests/test_estimator.py", "tests/test_planner_solve.py"), "moving experts is free"),
    Mutation("route-skips-the-node-stage", "cost_models/routing.py",
             "    if nodes is not None:  # 2. inside each node", "    if False:  # 2. inside each node",
             ("tests/test_routing.py", "tests/test_estimator.py"),
             "the estimator's routing crosses nodes before filling replicas inside the node"),
    Mutation("atomic-write-direct", "cost_models/files.py",
             "    with atomic_path(path) as tmp:\n        tmp.write_text(text)\n",
             "    Path(path).write_text(text)\n",
             ("tests/test_atomic_writes.py",), "write_text_atomic writes the target in place"),
    Mutation("outputs-may-overwrite-inputs", "cost_models/files.py",
             "        if key in ins:\n", "        if False:\n",
             ("tests/test_hostile_inputs.py",), "an output path equal to an input is accepted"),
    Mutation("finite-number-accepts-nan", "cost_models/files.py",
             "    if not math.isfinite(value):\n", "    if False:\n",
             ("tests/test_hostile_inputs.py",), "a NaN or infinite number passes the input checks"),
    # --- planner ---------------------------------------------------------------------------------
    Mutation("trace-accepts-negative-counts", "planner/trace.py",
             "    if (counts < 0).any():\n", "    if False:\n",
             ("tests/test_hostile_inputs.py",), "a trace with negative token counts is read"),
    Mutation("plan-validation-skips-share-sums", "planner/plan.py",
             "        if len(off):\n            raise InputError(f\"{prefix}shares of expert",
             "        if False:\n            raise InputError(f\"{prefix}shares of expert",
             ("tests/test_plan.py",), "a plan whose shares do not sum to 1 validates"),
    Mutation("plan-validation-skips-owner", "planner/plan.py",
             "        if len(orphans):\n", "        if False:\n",
             ("tests/test_plan.py",), "an owner without a replica validates"),
    Mutation("step-shares-always-fallback", "planner/step_shares.py",
             "        if response.status != linear_solver_pb2.MPSOLVER_OPTIMAL:\n",
             "        if True:\n",
             ("tests/test_step_shares.py",), "the per-step LP is never used: plan shares always"),
    Mutation("step-shares-keeps-slower-lp", "planner/step_shares.py",
             "        if ours > estimate(self.cluster, counts, x, plan_share, owner).step_time:\n",
             "        if False:\n",
             ("tests/test_step_shares.py",), "LP shares are used even where the estimator ranks them slower"),
    Mutation("physical-map-leaves-empty", "planner/physical_map.py",
             "        rows.append(fill_slots(assign, load).reshape(-1))\n",
             "        rows.append(assign.reshape(-1))\n",
             ("tests/test_interop.py",), "the physical map keeps -1 (empty) slots"),
    Mutation("eplb-mapping-accepts-ids-below-empty", "planner/eplb_mapping.py",
             "    if ((phy2log < EMPTY) | (phy2log >= num_experts)).any():\n",
             "    if (phy2log >= num_experts).any():\n",
             ("tests/test_plan.py",), "EPLB mapping accepts ids below -1 (the empty slot)"),
    Mutation("greedy-returns-its-start", "planner/greedy.py",  # cands[0] is the start (static) placement
             "    name, x, share, owner = cands[i]\n",
             "    name, x, share, owner = cands[0]\n"
             "    best = verdict(cluster, counts, x, clean_shares(x, share), owner, current, interval)\n",
             ("tests/test_planner_solve.py",), "greedy returns its input (static) placement"),
    Mutation("ilp-returns-its-hint", "planner/ilp.py",
             "            info.update(returned=\"ilp\")\n",
             "            info.update(returned=\"ilp\")\n            x, share, owner = hx, hs, ho\n",
             ("tests/test_planner_ilp.py", "tests/test_planner_pins.py"), "the ILP hands back its hint"),
    Mutation("bound-times-1.5", "planner/bounds.py",
             "    return max(compute_bound(cluster, counts), traffic_bound(cluster, counts))\n",
             "    return 1.5 * max(compute_bound(cluster, counts), traffic_bound(cluster, counts))\n",
             ("tests/test_bounds.py",), "the quick lower bound is not valid"),
    Mutation("balance-sweeps-from-the-start", "planner/bounds.py",  # ramps begun before t1 counted twice
             "        times = np.concatenate([np.maximum(start[m], t1), stop[m]])\n",
             "        times = np.concatenate([start[m], stop[m]])\n",
             ("tests/test_bounds.py",), "the traffic bound's sweep counts what the ends moved before t1 again"),
    Mutation("objective-ignores-migration", "planner/score.py",
             "        return self.estimate.step_time + self.migration_s\n",
             "        return self.estimate.step_time\n",
             ("tests/test_planner_solve.py", "tests/test_verdict.py"), "solvers judge plans without their migration cost"),
    Mutation("capacity-drops-nothing", "planner/baselines.py",
             "\"dropped_tokens\": int(dropped),", "\"dropped_tokens\": 0,",
             ("tests/test_planner_solve.py",), "the capacity baseline reports no dropped tokens",
             (("planner/solvers.py", "\"dropped_tokens\": int(dropped),", "\"dropped_tokens\": 0,"),)),
    # --- runtime ---------------------------------------------------------------------------------
    Mutation("trigger-comparison-flipped", "runtime/replan.py",
             "            due = balance(smoothed, plan, self.share_rule) > self.threshold\n",
             "            due = balance(smoothed, plan, self.share_rule) < self.threshold\n",
             ("tests/test_replanner_single_rank.py",), "an early re-plan starts when balance is good, not bad"),
    Mutation("monitor-balance-min-over-mean", "runtime/monitor.py",
             "    return float(max(1.0, (tokens.max(axis=1)[ok] / mean[ok]).max(initial=1.0)))\n",
             "    return float(max(1.0, (tokens.min(axis=1)[ok] / mean[ok]).max(initial=1.0)))\n",
             ("tests/test_replanner_single_rank.py",), "the monitor's balance never reports imbalance"),
    Mutation("replan-skips-validation", "runtime/replan.py",
             "            plan.validate()\n", "            pass\n",
             ("tests/test_replanner_single_rank.py",), "a corrupt broadcast plan is applied"),
    Mutation("adamw-no-bias-correction", "runtime/owners.py",
             "        p.addcdiv_(m, denom, value=-self.lr / (1 - self.beta1 ** t))\n",
             "        p.addcdiv_(m, denom, value=-self.lr)\n",
             ("tests/test_runtime_units.py",), "the experts' AdamW skips the first moment's bias correction"),
    Mutation("dispatch-ignores-gates", "runtime/dispatch.py",
             "    w = gate.reshape(-1)[send_pairs].unsqueeze(1).to(back.dtype)\n",
             "    w = torch.ones_like(gate.reshape(-1)[send_pairs]).unsqueeze(1).to(back.dtype)\n",
             ("tests/test_runtime_units.py",), "the combine ignores the gate weights"),
    Mutation("resume-forgets-expert-moments", "runtime/layer.py",
             "                m.copy_(moments[0, l, e])\n", "                pass\n",
             ("tests/test_resume_exact.py",), "a resumed run starts the owners' first moments at zero"),
    Mutation("resume-forgets-dense-optimizer", "runtime/trainer.py",
             "dense_opt.load_state_dict(doc[\"dense_opt\"])", "dense_opt.__class__  # load_state_dict skipped",
             ("tests/test_resume_exact.py",), "a resumed run starts the dense AdamW afresh"),
    Mutation("checkpoint-accepts-other-world", "runtime/checkpoint.py",
             "    if world is not None and plan.num_devices != world:\n", "    if False:\n",
             ("tests/test_hostile_inputs.py",), "a checkpoint for another world size is loaded"),
    Mutation("planner-failures-not-counted", "runtime/replan.py",
             '        self.stats["planner_failures"] += 1\n', "        pass\n",
             ("tests/test_runtime_replan.py",), "a background planner that fails leaves no count or warning"),
    Mutation("trainer-skips-the-solver-check", "runtime/trainer.py",
             "        check_solver(self.solver)\n", "        pass\n",
             ("tests/test_solvers.py",), "an unknown solver name reaches the background planner"),
    Mutation("registry-greedy-runs-static", "planner/solvers.py",
             '"greedy": _greedy,', '"greedy": _static,',
             ("tests/test_solvers.py",), "the registry's name runs another solver"),
    Mutation("node-index-not-dense", "cost_models/cluster.py",
             "        return dense_nodes(self.node_of)\n",
             "        return self.node_of\n",
             ("tests/test_cluster.py",), "per-node sums index a node one-hot by raw node ids"),
    # --- experiments and the command line --------------------------------------------------------
    Mutation("validation-replays-other-shares", "experiments/layer_replay.py",
             'policy="static", dispatch="plan",', 'policy="static", dispatch="adaptive",',
             ("tests/test_profiler.py",), "the estimator's validation runs the layer with shares other than the case's"),
    Mutation("expert-slots-mix-up", "runtime/experts.py",
             "{n: v[slot] for n, v in zip(self.names, views)}", "{n: v[0] for n, v in zip(self.names, views)}",
             ("tests/test_runtime_units.py",), "every slot runs with slot 0's weights"),
    Mutation("compare-ignores-slots", "flexmoe/commands/compare.py",
             "        c = c.with_slots(slots)\n", "        pass\n",
             ("tests/test_compare.py",), "compare --slots is accepted and ignored"),
    Mutation("refine-ignores-migration", "planner/refine.py",
             "            if ne.step_time + nm < est.step_time + mig - MIN_GAIN:\n",
             "            if ne.step_time < est.step_time - MIN_GAIN:\n",
             ("tests/test_refine.py",), "the local search takes moves whose migration outweighs their gain"),
    Mutation("refine-without-levelling", "planner/refine.py",
             "        share, est = min(((t, estimate(cluster, counts, x, t, owner)) for t in tries), key=lambda r: r[1].step_time)\n",
             "        share, est = share, estimate(cluster, counts, x, share, owner)\n",
             ("tests/test_refine.py",), "levelled shares are the shares given"),
    Mutation("realise-without-pairing", "planner/refine.py",
             "                g = min(room(e), key=lambda g: (owed[g] <= hosted[g], hosted[g] - owed[g], busy[g]))\n",
             "                g = min(room(e), key=lambda g: busy[g])\n",
             ("tests/test_refine.py",), "followers of other nodes' experts ignore the owners' devices"),
    Mutation("layout-ignores-slow-sync", "planner/layout.py",
             "        s.Add(sync_o >= po * owed_o)\n", "",
             ("tests/test_layout.py",), "an owner's receipts across nodes cost its device nothing"),
    Mutation("split-plans-keep-built-shares", "planner/refine.py",
             "            share, _ = level_shares(cluster, counts, x, owner, clean_shares(x, share), rounds, within_nodes=True)\n",
             "            share = clean_shares(x, share)\n",
             ("tests/test_refine.py",), "node-split plans judged with the shares they were built with"),
    Mutation("ilp-not-hinted-with-split-plans", "planner/ilp.py",
             "        cands += split_plans(cluster, counts)\n", "",
             ("tests/test_refine.py",), "the ILP never starts from a plan that serves each node's own demand"),
    Mutation("forked-refines-ignored", "planner/refine.py",
             "            if v.objective < out[1].objective - MIN_GAIN:\n",
             "            if False:\n",
             ("tests/test_refine.py",), "a start refined in another process is never taken"),
    Mutation("forked-refines-fork-beside-threads", "planner/refine.py",
             "                or threading.active_count() > 1):\n", "                or False):\n",
             ("tests/test_refine.py",), "a process running other threads is forked"),
    Mutation("ilp-forks-no-second-start", "planner/ilp.py",
             "else _other_starts(ranked, workers - 1)\n", "else []\n",
             ("tests/test_refine.py",), "the ILP's spare worker refines nothing"),
    Mutation("greedy-ignores-split-plans", "planner/greedy.py",
             "        cands += split_plans(cluster, counts, rounds=1, paired=False)\n", "        pass\n",
             ("tests/test_refine.py",), "the greedy never judges a plan that serves each node's own demand"),
    Mutation("ilp-sync-sums-send-and-receive", "planner/ilp.py",
             "                m.Add(v >= sum(sends[g][cls]))\n                m.Add(v >= sum(recvs[g][cls]))\n",
             "                m.Add(v >= sum(sends[g][cls]) + sum(recvs[g][cls]))\n",
             ("tests/test_planner_ilp.py",), "the model charges a device its sync sends and receipts summed"),
    Mutation("ilp-sends-across-on-nvlink-too", "planner/ilp.py",
             "\n                  - sum(int(inst.send_out_i[g, e]) * out[e, k] for e in range(E) if inst.send_out_i[g, e] > 0))\n",
             ")\n",
             ("tests/test_planner_ilp.py",), "the model charges the blocks a source sends across nodes on NVLink as well"),
    Mutation("ilp-outflow-by-demand", "planner/ilp.py",
             "        part = np.divide(rest, node_rest[self.node_ix], out=by_demand, where=node_rest[self.node_ix] > 0)\n",
             "        part = by_demand\n",
             ("tests/test_planner_ilp.py",), "a host keeping its tokens local is charged its node's outflow"),
    Mutation("ilp-inflow-free", "planner/ilp.py",
             "                if ratio > 0:  # a block of slack", "                if False:  # a block of slack",
             ("tests/test_planner_ilp.py",), "the model lands the inflow from other nodes where it likes"),
    Mutation("ilp-inflow-parts-forbid-removals", "planner/ilp.py",
             "                    m.Add(1000 * (z[e, g] + 1) >= ratio * room)\n",
             "                    m.Add(1000 * (z[e, g] + 1) >= ratio * (served - d))\n",
             ("tests/test_planner_ilp.py",), "a replica the hint sent inflow to cannot be dropped"),
    Mutation("ilp-outflow-may-exceed-what-leaves", "planner/ilp.py",
             "            m.AddMaxEquality(out[e, k], [d - served, 0])\n",
             "            m.Add(out[e, k] >= d - served)\n",
             ("tests/test_planner_ilp.py",), "the model lets more cross nodes than leaves, to net it off NVLink sends"),
    Mutation("ilp-always-keeps-current-owners", "planner/ilp.py",
             "    obj, i = min(scored)\n", "    obj, i = scored[-1]\n",
             ("tests/test_planner_ilp.py",), "the ILP's plan keeps every current owner that holds a replica"),
    Mutation("ilp-never-keeps-current-owners", "planner/ilp.py",
             "    obj, i = min(scored)\n", "    obj, i = scored[0]\n",
             ("tests/test_planner_ilp.py",), "the ILP's plan moves optimizer state where keeping it is cheaper"),
    Mutation("demand-split-owners-on-one-node", "planner/construct.py",
             "            worst = float(np.maximum(h, o).max())\n", "            worst = float(k)\n",
             ("tests/test_refine.py",), "every split expert owned on node 0: its receipts cannot pair"),
    Mutation("node-bound-overcharges-sends", "planner/bounds.py",
             "                                                                      - _keepable(cl, self.counts))\n",
             "                                                                      - 0 * _keepable(cl, self.counts))\n",
             ("tests/test_bounds.py",), "a device's all-to-all floor forgets what it keeps (an invalid bound)"),
    Mutation("node-bound-owners-overlap-receipts-inside", "planner/bounds.py",
             "            s.Add(x2 >= pi * (w + w2 - spare))\n            if K > 1:\n"
             "                s.Add(x2 >= po * (w2 - spare) + pi * w)\n",
             "            if K > 1:\n                s.Add(x2 >= po * (w2 - spare))\n",
             ("tests/test_bounds.py",), "an owner's receipts from followers inside its node are taken as overlapped"),
    Mutation("node-bound-owners-overlap-nothing", "planner/bounds.py",
             "            s.Add(x2 >= pi * (w + w2 - spare))\n", "            s.Add(x2 >= pi * (w + w2 + 1))\n",
             ("tests/test_bounds.py",), "every expert's owner is charged a receipt more than it can pay (invalid)"),
    Mutation("ilp-budget-ignores-its-import", "planner/solvers.py",
             "        budget = max(options.time_budget - (time.perf_counter() - t0), 1e-3)\n",
             "        budget = options.time_budget\n",
             ("tests/test_solvers.py",), "the first ILP call runs its whole budget after importing OR-Tools"),
    Mutation("offline-last-stage-keeps-its-share", "experiments/offline.py",
             "        given = max(given, left - REALISE_SHARE * budget)\n", "        given = given\n",
             ("tests/test_offline.py",), "the offline bound's last stage stops at its share with time left in its lane"),
    Mutation("relaxation-infeasible-bound-in-solver-units", "planner/bounds.py",
             "        return float(upper) * (1 - SAFETY) if upper is not None else 0.0\n",
             "        return float(upper) * tau if upper is not None else 0.0\n",
             ("tests/test_bounds.py",), "a relaxation proving the known plan optimal reports upper x its time unit"),
]


def copy_tree(dest: Path) -> Path:
    tree = dest / "tree"
    shutil.copytree(ROOT, tree, ignore=IGNORE)
    return tree


def env_for(tree: Path) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return env


def check_imports_from(tree: Path) -> None:
    """The copy's modules, not an installed checkout's, must be the ones the tests import."""
    out = subprocess.run([sys.executable, "-c", "import planner, runtime, cost_models, flexmoe;"
                          "print(planner.__file__, runtime.__file__, cost_models.__file__, flexmoe.__file__)"],
                         cwd=tree, env=env_for(tree), capture_output=True, text=True, check=True).stdout.split()
    stray = [p for p in out if not Path(p).resolve().is_relative_to(tree.resolve())]
    if stray:
        raise SystemExit(f"the copy imports modules from elsewhere: {stray}")


def run_tests(tree: Path, files: tuple[str, ...], timeout_s: float) -> tuple[bool, str, float]:
    """(failed, which test failed first or why, seconds)."""
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files]
    try:
        p = subprocess.run(cmd, cwd=tree, env=env_for(tree), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return True, f"timed out after {timeout_s:.0f} s", time.monotonic() - t0
    seconds = time.monotonic() - t0
    if p.returncode == 0:
        return False, "", seconds
    text = p.stdout + p.stderr
    m = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", text, re.M)
    return True, m.group(1) if m else f"pytest exit {p.returncode}: {text.strip().splitlines()[-1:]}", seconds


def sweep(mutations: list[Mutation], timeout_s: float, baseline: bool) -> list[tuple[Mutation, str, str, float]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="flexmoe-mutants-") as tmp:
        tree = copy_tree(Path(tmp))
        check_imports_from(tree)
        if baseline:
            files = tuple(sorted({f for m in mutations for f in m.tests if (tree / f).exists()}))
            failed, which, s = run_tests(tree, files, timeout_s * 4)
            print(f"baseline ({len(files)} files, {s:.0f} s): {'FAILS at ' + which if failed else 'passes'}",
                  flush=True)
            if failed:
                raise SystemExit("the unmutated tree fails its tests: fix that first")
        for m in mutations:
            found, target, text, original, replacement = 0, None, "", "", ""
            for file, original, replacement in m.sites():  # the first site that holds the snippet
                target = tree / file
                text = target.read_text() if target.exists() else ""
                found = text.count(original)
                if found:
                    break
            missing = [f for f in m.tests if not (tree / f).exists()]
            if found != 1 or missing:
                why = "snippet missing" if found == 0 else f"snippet found {found} times" if found > 1 else ""
                rows.append((m, why or f"test file missing: {missing}", "", 0.0))
            else:
                target.write_text(text.replace(original, replacement))
                try:
                    failed, which, s = run_tests(tree, m.tests, timeout_s)
                finally:
                    target.write_text(text)
                rows.append((m, "caught" if failed else "SURVIVED", which, s))
            r = rows[-1]
            print(f"  {r[0].name}: {r[1]} {r[2]} ({r[3]:.0f} s)", file=sys.stderr, flush=True)
    return rows


def table(rows) -> str:
    head = ("mutation", "file", "result", "caught by", "s")
    body = [(m.name, m.file, result, which, f"{s:.0f}") for m, result, which, s in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *map(line, body)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only mutations whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per mutation's test run")
    ap.add_argument("--baseline", action="store_true", help="first check the unmutated tree passes")
    a = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if a.k in m.name]
    if a.list:
        for m in chosen:
            print(f"{m.name:34s} {m.file:30s} {m.breaks}")
        return 0
    rows = sweep(chosen, a.timeout, a.baseline)
    print(table(rows))
    return 0 if all(r[1] == "caught" for r in rows) else 1  # survived, or a snippet that rotted


if __name__ == "__main__":
    sys.exit(main())
