"""The drift experiment's numbers and report (OUT/results.json, OUT/report.md, OUT/drift.png)."""

from __future__ import annotations

import json
import math

from personascope.util import save_figure, write_json


def _conv_level(labels: dict, cid: str) -> int | None:
    """A conversation drifted (read) when the trait is shown (level 2) in its turn 3 or 4 answer."""
    got = [labels.get(f"{cid}#{k}") for k in (2, 3)]
    if any(v is None for v in got):
        return None
    return int(any(v == 2 for v in got))


def report(args, data, base, guarded, labels, scores, rule, f) -> None:
    convs, traj, alerts = data["convs"], data["trajectories"], data["alerts"]
    traits = sorted({c["trait"] for c in convs})
    res: dict = {"model": data["model"], "layers": data["layers"], "rule": rule.describe(), "traits": {},
                 "n_read": len(labels)}
    lines = [f"# Persona drift experiment ({data['model']})", "",
             f"Rule: {rule.describe()} (pre-turn z against each vector's calibrated normal range). "
             f"{len(convs)} conversations × 4 assistant turns, greedy, {args.max_new_tokens} new tokens. "
             f"Read labels: {len(labels)} answers (blind: question and answer only, docs/labelling.md); the "
             "probe judge (qwen2.5-coder-0.5b) scores every answer, the guard arm included.", ""]
    for trait in traits:
        group = [c for c in convs if c["trait"] == trait]
        pts = [(traj[c["id"]]["pre"][k], labels.get(f"{c['id']}#{k}"), scores.get(f"base:{c['id']}#{k}"), c["id"])
               for c in group for k in range(4)]

        def r_of(rows, j):
            return f["pearson_r"]([r[0] for r in rows], [r[j] for r in rows])

        by_conv = [[p for p in pts if p[3] == c["id"]] for c in group]

        def r_conv(sample, j):
            return r_of([p for conv in sample for p in conv], j)

        r_read, r_judge = r_of(pts, 1), r_of(pts, 2)
        ci_read = f["bootstrap_ci"](by_conv, lambda s: r_conv(s, 1))
        ci_judge = f["bootstrap_ci"](by_conv, lambda s: r_conv(s, 2))
        # the rule's score and verdict per conversation against the read "drifted" label
        rows = [(rule.score(traj[c["id"]]["pre_z"]), _conv_level(labels, c["id"]), alerts[c["id"]] is not None,
                 c["condition"]) for c in group]
        read_rows = [r for r in rows if r[1] is not None]
        auc = f["auroc"]([r[0] for r in read_rows], [r[1] for r in read_rows]) if read_rows else math.nan
        auc_ci = f["bootstrap_ci"](read_rows, lambda s: f["auroc"]([r[0] for r in s], [r[1] for r in s]))
        auc_cond = f["auroc"]([r[0] for r in rows], [r[3] == "drift" for r in rows])
        flagged = {cond: sum(r[2] for r in rows if r[3] == cond) for cond in ("drift", "neutral")}
        # the auto-guard: judged trait of the turns after the alert, with and without it
        after_base, after_guard, changed = [], [], {"drift": 0, "neutral": 0}
        for c in group:
            t = alerts[c["id"]]
            if c["id"] not in guarded or t is None:
                continue
            for k in range(t + 1, 4):
                after_base.append(scores.get(f"base:{c['id']}#{k}"))
                after_guard.append(scores.get(f"guard:{c['id']}#{k}"))
            changed[c["condition"]] += any(guarded[c["id"]][k] != base[c["id"]][k] for k in range(4))
        n_cond = {cond: sum(c["condition"] == cond for c in group) for cond in ("drift", "neutral")}
        pairs = [(a, b) for a, b in zip(after_base, after_guard, strict=True) if a is not None and b is not None]
        tr = {"r_pre_vs_read": r_read, "r_pre_vs_read_ci": ci_read, "r_pre_vs_judge": r_judge,
              "r_pre_vs_judge_ci": ci_judge, "auroc_rule_vs_read": auc, "auroc_rule_vs_read_ci": auc_ci,
              "n_read_conversations": len(read_rows), "n_read_drifted": sum(r[1] for r in read_rows),
              "auroc_rule_vs_condition": auc_cond, "flagged": flagged, "n": n_cond,
              "guard_turns": len(pairs),
              "trait_after_alert_base": f["mean"]([p[0] for p in pairs]) if pairs else None,
              "trait_after_alert_guard": f["mean"]([p[1] for p in pairs]) if pairs else None,
              "answers_changed": changed}
        res["traits"][trait] = tr
        lines += [f"## {trait} (layer {data['layers'][trait]})", "",
                  "| measure | value |", "|---|---|",
                  f"| r(pre-turn projection, read level), {sum(p[1] is not None for p in pts)} turns | "
                  f"{_fmt(r_read)}{f['format_ci'](ci_read)} |",
                  f"| r(pre-turn projection, judge score), {len(pts)} turns | "
                  f"{_fmt(r_judge)}{f['format_ci'](ci_judge)} |",
                  f"| AUROC of the rule's score vs read 'drifted' ({len(read_rows)} conversations, "
                  f"{tr['n_read_drifted']} drifted) | {_fmt(auc)}{f['format_ci'](auc_ci)} |",
                  f"| AUROC vs condition (drift script vs neutral script) | {_fmt(auc_cond)} |",
                  f"| flagged by the rule: drift / neutral | {flagged['drift']}/{n_cond['drift']} / "
                  f"{flagged['neutral']}/{n_cond['neutral']} |",
                  f"| judged trait after the alert: no guard → auto-guard ({len(pairs)} turns) | "
                  f"{_fmt(tr['trait_after_alert_base'], 1)} → {_fmt(tr['trait_after_alert_guard'], 1)} |",
                  f"| conversations whose answers the auto-guard changed: drift / neutral | "
                  f"{changed['drift']}/{n_cond['drift']} / {changed['neutral']}/{n_cond['neutral']} |", ""]
    _plot(args, convs, traj, traits, labels)
    lines += ["![trajectories](drift.png)", ""]
    write_json(args.out / "results.json", res)
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(res, indent=1, default=str))


def _fmt(x, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _plot(args, convs, traj, traits, labels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(traits), figsize=(5.5 * len(traits), 3.6), squeeze=False)
    for ax, trait in zip(axes[0], traits, strict=True):
        for c in convs:
            if c["trait"] != trait:
                continue
            color = "tab:red" if c["condition"] == "drift" else "tab:blue"
            ax.plot(range(1, 5), traj[c["id"]]["pre_z"], color=color, alpha=0.5, marker="o", ms=3)
        ax.set_title(f"{trait}: pre-turn z (red: drift script, blue: neutral)", fontsize=9)
        ax.set_xlabel("assistant turn")
        ax.set_ylabel("z")
    save_figure(fig, args.out / "drift.png")
