"""The results store of a run: every row and summary so far, the provenance, and the results
files (clbench.results.contract defines their columns), rewritten atomically after every stage."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from clbench.method import call_hook, count_trainable
from clbench.config import RunConfig
from clbench.distributed import collectives
from clbench.results import metrics, contract
from clbench.results.stats import not_learned_by_margin

if TYPE_CHECKING:
    from clbench.results.rundir import RunDir

MULTITASK = "multitask"  # the stage label of the joint reference's row in matrix.csv


@dataclass
class CostLog:
    """The running costs and stage log of one (method, seed)."""

    train_s: float = 0.0
    eval_s: float = 0.0
    peak: float = 0.0
    stages: list = None

    def __post_init__(self):
        self.stages = list(self.stages or [])

    def add(self, train_s: float, eval_s: float, peak: float) -> None:
        self.train_s, self.eval_s, self.peak = self.train_s + train_s, self.eval_s + eval_s, max(self.peak, peak)


def stage_entry(t, task, stats, es, ck_mb=None) -> dict:
    """One stage's entry of contract.json's per-stage log."""
    return {"stage": t, "task": task, "steps": stats["steps"], "first_loss": stats["first_loss"],
            "last_loss": stats["last_loss"], "train_seconds": stats["seconds"], "eval_seconds": es, "checkpoint_mb": ck_mb,
            **({"schedule": stats["schedule"]} if "schedule" in stats else {}),  # the stage's lr schedule (clbench.schedule)
            **({"optimizer": stats["optimizer"]} if "optimizer" in stats else {}),  # the optimizer it trained with
            # the method's own per-stage diagnostics (Method.stage_stats): a regulariser's share of the loss, ...
            **({"method_stats": stats["method_stats"]} if stats.get("method_stats") else {}),
            # per rank: bytes of parameters, gradients and optimizer state held at the stage's last step, peak memory
            **({"per_rank": stats["per_rank"]} if "per_rank" in stats else {})}


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:
        return None


def meta_info(model_desc: str, device, autocast) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("clbench", "torch", "transformers", "peft", "lm_eval", "datasets", "accelerate", "pydantic"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    hw = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
          "device": str(device), "autocast": str(autocast) if autocast else "none",
          "torch_threads": torch.get_num_threads(), "processes": collectives.world_size()}
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
    return {"versions": versions, "model": model_desc, "hardware": hw}


def _stage_label(v: str):
    """matrix.csv's stage: an int for the stream's stages, a label for extra rows (multitask, merged:*)."""
    return int(v) if str(v).lstrip("-").isdigit() else str(v)


def ordered_rows(rows: list[dict], plan) -> list[dict]:
    """matrix.csv rows in the config's order (methods, seeds, stages, then extra rows, tasks), the
    order an uninterrupted run computes them in: a resumed run may redo stages after other rows, and a
    matrix.csv rebuilt from contract.json must be the file an uninterrupted run writes. Rows may carry
    their values as the recorder holds them (int stages and seeds) or as matrix.csv reads back
    (strings). Stable: rows of methods no longer in the config keep their order."""
    m_ix = {s.run_name: i for i, s in enumerate(plan.method_specs)}
    s_ix = {str(s): i for i, s in enumerate(plan.cfg.seeds)}
    t_ix = {t: i for i, t in enumerate(plan.eval_names)}
    extra_ix: dict = {}
    for r in rows:
        if not str(r["stage"]).isdigit():
            extra_ix.setdefault(str(r["stage"]), len(extra_ix))

    def key(r):
        st = str(r["stage"])
        return (m_ix.get(r["method"], len(m_ix)), s_ix.get(str(r["seed"]), len(s_ix)),
                (0, int(st)) if st.isdigit() else (1, extra_ix[st]), t_ix.get(r["eval_task"], len(t_ix)))

    return sorted(rows, key=key)


class Recorder:
    """Holds every result so far and rewrites the results files atomically after each stage."""

    def __init__(self, rundir: RunDir, cfg: RunConfig, plan):
        self.rundir, self.cfg, self.plan = rundir, cfg, plan
        self.out = rundir.path
        self.rows: list[dict] = []
        self.summary: list[dict] = []
        self.methods: dict = {}
        self.meta: dict = {}
        self.config_changes: list = []
        self.warned: set[str] = set()  # methods whose world-size dependence was printed

    def load_existing(self) -> bool:
        """Pick up the results of an earlier, interrupted run of the same config."""
        rows = self.rundir.read_rows()
        if rows is None:
            return False
        prev = self.rundir.results()
        self.methods = prev.get("methods", {})
        self.config_changes = prev.get("run", {}).get("config_changes", [])
        self.rows = [{**r, "seed": int(r["seed"]), "stage": _stage_label(r["stage"]), "value": float(r["value"])}
                     for r in rows[0]]
        self.summary = [{**r, "seed": int(r["seed"])} for r in rows[1]]
        for r in self.summary:
            for k, v in r.items():
                if k not in ("method", "seed", "mode", *contract.FLAG_COLUMNS):  # flags are text (task names)
                    r[k] = (int if k == "trainable_params" else float)(v) if v not in ("", None) else None
        return True

    def drop(self, method, seed, after_stage: int) -> None:
        """Forget the rows of stages after `after_stage`, and every extra row (multitask, merged:*)."""
        self.rows = [r for r in self.rows if not (r["method"] == method and r["seed"] == seed
                                                  and (not isinstance(r["stage"], int) or r["stage"] > after_stage))]

    def drop_extra(self, method, seed) -> None:
        self.rows = [r for r in self.rows if not (r["method"] == method and r["seed"] == seed
                                                  and not isinstance(r["stage"], int))]

    def base_scores(self) -> dict | None:
        base = {r["eval_task"]: r["value"] for r in self.rows if r["stage"] == 0}
        return base if set(base) == set(self.plan.eval_names) else None

    def stage_scores(self, method, seed, stage) -> dict | None:
        """{eval_task: value} of one row (an int stage or a label such as `multitask`), or None."""
        got = {r["eval_task"]: r["value"] for r in self.rows
               if r["method"] == method and r["seed"] == seed and r["stage"] == stage}
        return got if set(got) >= set(self.plan.task_names) else None

    def extra_rows(self, method, seed) -> dict[str, dict]:
        """merged:* rows: {stage label: {eval_task: value}}."""
        out: dict[str, dict] = {}
        for r in self.rows:
            if r["method"] == method and r["seed"] == seed and str(r["stage"]).startswith("merged:"):
                out.setdefault(r["stage"], {})[r["eval_task"]] = r["value"]
        return out

    def update_intransigence(self) -> None:
        """Intransigence of every complete sequential (method, seed) against the run's multitask
        reference of the same seed (metrics.intransigence; a* = the joint model's score on task k).
        With several multitask references, a method is paired with the one of the same method name."""
        refs = {(m, s): r for m in self.methods if self.methods[m].get("mode") == MULTITASK
                for s in self.cfg.seeds if (r := self.stage_scores(m, s, MULTITASK)) is not None}
        if not refs:
            return
        names = self.plan.task_names
        spec_name = {m.run_name: m.name for m in self.plan.method_specs}
        for row in self.summary:
            m, s = row["method"], row["seed"]
            if self.methods.get(m, {}).get("mode", "sequential") != "sequential" or row.get("acc") is None:
                continue
            cands = [k for k in refs if k[1] == s]
            if len(cands) > 1:
                cands = [k for k in cands if spec_name.get(k[0]) == spec_name.get(m)]
            if len(cands) != 1:
                continue
            joint = [refs[cands[0]][t] for t in names]
            per_task = metrics.intransigence(self.matrix(m, s), joint)
            row["intransigence"] = float(sum(per_task) / len(per_task))
            seed_entry = self.methods[m]["seeds"].get(str(s))
            if seed_entry is not None:
                seed_entry["intransigence"] = {"reference": cands[0][0], "per_task": per_task,
                                               "mean": row["intransigence"]}

    def add_row(self, method, seed, stage, trained, scores: dict):
        for task in self.plan.eval_names:
            self.rows.append({"method": method, "seed": seed, "stage": stage, "trained_task": trained or "",
                              "eval_task": task, "metric": self.plan.task_defs[task].metric_name, "value": scores[task],
                              "eval_group": ("heldout" if task in self.plan.heldout else
                                             "other_kind" if task in self.plan.other_kind else "stream")})

    def heldout_matrix(self, method, seed, multitask: bool = False) -> list[list[float]]:
        return self._grid(method, seed, self.plan.heldout, multitask)

    def other_kind_matrix(self, method, seed, multitask: bool = False) -> list[list[float]]:
        """eval.other_kind: the stream scored the other way, column i = stream task i's twin."""
        return self._grid(method, seed, self.plan.other_kind, multitask)

    def matrix(self, method, seed) -> list[list[float]]:
        return self._grid(method, seed, self.plan.task_names)

    def _grid(self, method, seed, names: list[str], multitask: bool = False) -> list[list[float]]:
        """Rows of the stream's stages 0..t (extra rows left out), columns `names`; for a multitask
        reference, its two rows: the base model's (stage 0) and the joint model's."""
        by_stage: dict = {}
        for r in self.rows:
            if r["method"] == method and r["seed"] == seed and r["eval_task"] in names and (
                    isinstance(r["stage"], int) or (multitask and r["stage"] == MULTITASK)):
                by_stage.setdefault(r["stage"], {})[r["eval_task"]] = r["value"]
        order = sorted(by_stage, key=lambda s: (s == MULTITASK, s if isinstance(s, int) else 0))
        return [[by_stage[s][t] for t in names] for s in order]

    def _ordered_rows(self) -> list[dict]:
        return ordered_rows(self.rows, self.plan)

    def flush(self):
        if not collectives.is_main():  # one writer: the other ranks hold the same results
            return
        self.rundir.write_rows(contract.MATRIX_COLUMNS, self._ordered_rows(), contract.SUMMARY_COLUMNS, self.summary)
        self.rundir.write_results({
            "run": {"name": self.cfg.name, "stream": self.cfg.stream or "custom", "order": self.cfg.order if self.cfg.stream else "custom",
                    "tasks": self.plan.task_names, "seeds": self.cfg.seeds, "git_sha": git_sha(),
                    "config_hash": self.cfg.hash(), "config_changes": self.config_changes,
                    "config": self.cfg.model_dump(mode="json")},
            "meta": self.meta,
            "methods": self.methods,
        })

    def record_method(self, name, seed, meth, model, train_s, eval_s, peak, stage_log, mode="sequential",
                      merges_pending=False):
        """The matrix, metrics and costs of one (method, seed) as they stand, into the summary and contract.json."""
        rec = self
        T = len(rec.plan.task_names)
        # a method whose numbers depend on the number of processes says why (every other one's do not)
        why = call_hook(meth, "world_size_dependent")
        if why and collectives.world_size() > 1 and collectives.is_main() and name not in rec.warned:
            rec.warned.add(name)
            print(f"clbench: {name}: its results depend on the number of processes ({why})", file=sys.stderr, flush=True)
        trainable = call_hook(meth, "trainable_params", model)
        if trainable is None:
            trainable = count_trainable(model)
        if mode == "multitask":
            joint = rec.stage_scores(name, seed, MULTITASK)
            done = joint is not None
            summ = {"acc": float(sum(joint[t] for t in rec.plan.task_names) / T)} if done else {}
            base = rec.stage_scores(name, seed, 0)
            R = [[base[t] for t in rec.plan.task_names]] if base else []
            if done:
                R.append([joint[t] for t in rec.plan.task_names])
        else:
            R = rec.matrix(name, seed)
            done = len(R) - 1 == T
            if not done:
                summ = {}
            elif mode == "single":  # only the diagonal means something: each task's single-task score
                summ = {"la": metrics.learning_accuracy(R)}
            else:
                summ = metrics.summary(R)
                # "did not learn" (clbench.results.stats): the tasks whose learning gain is not above the margin
                summ["did_not_learn"] = ";".join(rec.plan.task_names[i] for i in not_learned_by_margin(R))
        # the held-out and other-kind rows of every mode are kept in contract.json, so that matrix.csv
        # can be rebuilt whole from it (a reference's rows too); only the stream's mean anything to
        # general_delta and the other-kind metrics
        seq = mode == "sequential"
        G = rec.heldout_matrix(name, seed, mode == "multitask") if rec.plan.heldout and len(R) > 0 else None
        if summ and G is not None and seq:
            summ["general_delta"] = metrics.general_ability_delta(G)[-1]
        O = rec.other_kind_matrix(name, seed, mode == "multitask") if rec.plan.other_kind and len(R) > 0 else None
        complete = done and not merges_pending
        row = {"method": name, "seed": seed, "mode": mode, **summ, "trainable_params": int(trainable),
               "train_seconds": train_s, "eval_seconds": eval_s, "peak_mem_mb": peak}
        rec.summary = [r for r in rec.summary if not (r["method"] == name and r["seed"] == seed)]
        if summ:
            rec.summary.append(row)
        entry = rec.methods.setdefault(name, {"seeds": {}})
        entry["mode"] = mode
        merged = rec.extra_rows(name, seed)
        entry["seeds"][str(seed)] = {
            "matrix": R, "complete": complete, "metrics": summ, "trainable_params": int(trainable),
            **({"merged": merged} if merged else {}),
            **({"heldout_tasks": rec.plan.heldout, "heldout_matrix": G} if G is not None else {}),
            **({"general_delta_per_stage": metrics.general_ability_delta(G)} if G is not None and seq else {}),
            **({"other_kind_tasks": rec.plan.other_kind, "other_kind_matrix": O} if O is not None else {}),
            **({"other_kind_metrics": metrics.summary(O) if done else {}} if O is not None and seq else {}),
            "train_seconds": train_s, "eval_seconds": eval_s, "peak_mem_mb": peak, "stages": list(stage_log),
            **({"world_size_dependent": why} if why else {})}
        rec.update_intransigence()
