"""`zoom discover` on the shapes world: with the world's vocabulary (never told about "red"), does discovery
find the bias trained into each target? Prints a table and writes OUT/discover_world.json.

    python tools/discover_world.py [--levels 0.99,0.9,0.75,0.2] [--domains green-square] [--seed 1000]
        [--screen-samples 8] [--samples 16] [--top-k 5] [--screens bracket,gradient] [--free]
        [--out runs/discover-world]

For each target (red circles at P(red | circle) = p; 0.2 is the balanced one) and domain (tools/validate_world.py's
DOMAINS), one discovery through zoom.discover.discover with the bundled `demo` config. Reported per run: red's
screening rank (among proposals that do not change the label), the significant confirmed attributes in order,
hit@1 / hit@5 (red first / in the top five significant), precision@1 / @5 (the share of the top one / five
significant attributes that are red, the one trained-in bias), and the cost of screening and confirmation.

With several --screens, one discovery per screen (the first's is the main row; the others in OUT/<run>-SCREEN,
on the same seeds), each with its hit@1 / precision@1 and cost. With --free, the gradient run also optimises a
free direction (--free-direction) and the row gives red's rank among the proposals nearest to it.

Two measurements beside it:
- each screen against the full audit: every proposal audited on the confirmation seeds (OUT/<run>-full),
  Spearman's rho between the screening scores and the full audit's confirmed flip rates (rho_rate) and
  confirmed rate minus null twins' (rho), over the proposals that do not change the label, and whether the
  full audit's significant attributes were among the k the screen chose;
- a correlational baseline in the style of B2T (Kim et al., 2024): BASELINE_IMAGES rendered squares of the
  world (every colour, background, size and pattern), split by whether the target calls them circles; each
  proposal scored by the judge CLIP's mean similarity to its prompt on the flipped images minus on the
  unflipped ones; its ranking's precision@1 / @5 (the share of its top one / five that are red).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from validate_world import domain_prompts, target_spec  # noqa: E402

TRUE = "red"
BASELINE_IMAGES = 2000
BASELINE_SEED = 50_000


def baseline(p: float, proposals: list[dict]) -> dict:
    """B2T-style: judge CLIP similarity gap of each proposal's prompt, flipped minus unflipped world squares."""
    import numpy as np
    import torch

    from zoom.config import load_config
    from zoom.guide import Clip
    from zoom.targets import load_target
    from zoom.world import Scene, render_batch

    config = load_config("demo")
    target = load_target(target_spec(p)).eval()
    judge = Clip.load(config.judge.model, config.judge.pretrained, "cpu")
    scenes = [Scene.from_seed(BASELINE_SEED + i, shape="square") for i in range(BASELINE_IMAGES)]
    images = torch.from_numpy(render_batch(scenes)).permute(0, 3, 1, 2).float() / 255
    circle = target.labels.index("circle")
    with torch.no_grad():
        flipped = torch.cat([target(b).argmax(-1) == circle for b in images.split(256)]).numpy()
        emb = torch.cat([judge.embed_images(b) for b in images.split(256)])
        candidates = [s for s in proposals if not s["changes_label"]]
        texts = judge.embed_texts([s["prompt"] for s in candidates])
    sims = (emb @ texts.T).numpy()
    if flipped.all() or not flipped.any():
        return {"flipped_images": int(flipped.sum()), "of": BASELINE_IMAGES, "ranking": None,
                "precision@1": None, "precision@5": None}
    gap = sims[flipped].mean(0) - sims[~flipped].mean(0)
    order = [candidates[i]["name"] for i in np.argsort(-gap)]
    return {"flipped_images": int(flipped.sum()), "of": BASELINE_IMAGES, "ranking": order[:5],
            "red_rank": order.index(TRUE) + 1, "precision@1": float(order[0] == TRUE),
            "precision@5": order[:5].count(TRUE) / 5}


def full_audit(run_dir: Path, results: dict, args) -> dict:
    """Every proposal audited on the confirmation seeds: how well did each cheap screen rank them?"""
    from scipy import stats

    from zoom.discover import _audit

    result = next(iter(results.values()))

    plan = json.loads((run_dir / "discover-plan.json").read_text())
    chosen = [s for s in result["proposals"] if not s["changes_label"]]
    overrides = {"target.spec": plan["target"], "search.mode": "single", "search.samples": args.samples,
                 "search.seed": plan["confirm_seeds"][0],
                 "prompts": {"domain": plan["domain"], "attributes": [{"name": s["name"], "prompt": s["prompt"]}
                                                                     for s in chosen],
                             "null": domain_null(plan)},
                 "oracle": {s["name"]: o for s in chosen if (o := oracle_of(s))}}
    report, _ = _audit("demo", Path(str(run_dir) + "-full"), overrides, False)  # shared by every screen's run
    rows = {a["name"]: a for a in report["attributes"]}
    full = {n: (r["confirmed_rate"] or 0) - (r["null_confirmed_rate"] or 0) for n, r in rows.items()}
    rate = {n: r["confirmed_rate"] or 0 for n, r in rows.items()}
    sig = [a["name"] for a in report["attributes"] if a["significant"]]

    def rho(screened: dict, truth: dict):
        by = {s["name"]: s["screening"]["score"] or 0 for s in screened["proposals"]}
        value = stats.spearmanr([by[s["name"]] for s in chosen], [truth[s["name"]] for s in chosen]).statistic
        return None if value != value else round(float(value), 3)

    out = {"full_significant": sig, "full_first": report["attributes"][0]["name"],
           "full_rates": {n: round(v, 3) for n, v in rate.items()},
           "full_cost_counterfactuals": report["cost"]["counterfactuals"], "screens": {}}
    for screen, r in results.items():
        out["screens"][screen] = {"rho": rho(r, full), "rho_rate": rho(r, rate),
                                  "full_significant_in_screen_top_k": [n for n in sig if n in r["confirm"]["chosen"]]}
    first = out["screens"][next(iter(results))]  # the main row's keys, as before
    out["spearman_screen_vs_full"] = first["rho"]
    out["full_significant_in_screen_top_k"] = first["full_significant_in_screen_top_k"]
    return out


def domain_null(plan: dict) -> list[str]:
    from zoom.world import PREFIXES

    return [f"{prefix} {plan['domain']}" for prefix in PREFIXES]


def oracle_of(s: dict):
    from zoom.discover import load_vocabulary

    for c in load_vocabulary("world").categories:
        if c.name == s["category"] and c.oracle:
            return {"spec": c.oracle, "label": s["name"].split()[0]}
    return None


def summarise(result: dict) -> dict:
    """hit@1 / precision@1 and cost of one discovery."""
    sig = result["discovered"]
    return {"chosen": result["confirm"]["chosen"], "significant": sig, "hit@1": TRUE in sig[:1],
            "precision@1": (sig[:1].count(TRUE) / len(sig[:1])) if sig else None,
            "screening_cost": result["cost"]["screening"], "free_direction": result.get("free_direction")}


def free_rank(result: dict) -> dict | None:
    """Red among the proposals nearest the free direction: its rank among all and among those that keep the label."""
    free = result.get("free_direction")
    if not free:
        return None
    path = Path(free["file"])
    nearest = [r["name"] for r in json.loads(path.read_text())["nearest"]]
    label = {s["name"] for s in result["proposals"] if s["changes_label"]}
    kept = [n for n in nearest if n not in label]
    return {"red_rank": nearest.index(TRUE) + 1, "red_rank_label_kept": kept.index(TRUE) + 1, "of": len(nearest),
            "nearest": nearest[:5], "named": free["named"], "flipped": free["flipped"], "of_seeds": free["of"],
            "cost": result["cost"]["free_direction"]}


def run(out: Path, domain: str, p: float, args) -> dict:
    from zoom.discover import discover

    run_dir = out / f"{domain}-p{round(p * 100):02d}"
    results = {}
    for i, screen in enumerate(args.screens.split(",")):
        where = run_dir if i == 0 else Path(f"{run_dir}-{screen}")
        results[screen] = discover(
            "demo", where, vocabulary="world", prompts=domain_prompts(domain)["prompts"], target_spec=target_spec(p),
            seed=args.seed, samples=args.samples, screen_samples=args.screen_samples, top_k=args.top_k,
            screen=screen, free_direction=args.free and screen == "gradient", progress=False,
            resume=(where / "discover-plan.json").exists(), echo=lambda *_: None)
    result = next(iter(results.values()))
    ranked = [s["name"] for s in result["proposals"] if not s["changes_label"]]
    sig = result["discovered"]  # significant confirmed, in the confirmation report's order
    top1, top5 = sig[:1], sig[:5]
    return {"domain": domain, "p": p, "screened": result["screened"],
            "red_screen_rank": ranked.index(TRUE) + 1 if TRUE in ranked else None,
            "red_screen_score": next((s["screening"]["score"] for s in result["proposals"] if s["name"] == TRUE), None),
            "confirmed": [(c["name"], c["confirmed_flips"], c["n"], c["q_value"], c["significant"])
                          for c in result["confirmed"]],
            "significant": sig, "hit@1": TRUE in top1, "hit@5": TRUE in top5,
            "precision@1": (top1.count(TRUE) / len(top1)) if top1 else None,
            "precision@5": (top5.count(TRUE) / len(top5)) if top5 else None,
            "cost": result["cost"], "screens": {s: summarise(r) for s, r in results.items()},
            "free": next((free_rank(r) for r in results.values() if r.get("free_direction")), None),
            "screen_vs_full": full_audit(run_dir, results, args) if args.full else None,
            "baseline": baseline(p, result["proposals"]) if args.baseline else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="0.99,0.9,0.75,0.2")
    parser.add_argument("--domains", default="green-square")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--screen-samples", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--screens", default="bracket", help="comma-separated: bracket,gradient")
    parser.add_argument("--free", action="store_true", help="the gradient run also finds and names a free direction")
    parser.add_argument("--out", default="runs/discover-world")
    parser.add_argument("--no-full", dest="full", action="store_false", help="skip the full audit of every proposal")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the B2T-style baseline")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for domain in args.domains.split(","):
        for p in map(float, args.levels.split(",")):
            rows.append(run(out, domain, p, args))
            print(json.dumps(rows[-1]), flush=True)
            (out / "discover_world.json").write_text(json.dumps(rows, indent=1))
    print("\n| domain | target | red's screening rank | significant (confirmed) | hit@1 | hit@5 | P@1 | P@5 | "
          "screening: UNet calls, s | confirmation: UNet calls, s |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, c = r["cost"]["screening"], r["cost"]["confirmation"] or {}
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"| {r['domain']} | {'balanced' if r['p'] == 0.2 else 'p = ' + str(r['p'])} | {r['red_screen_rank']} of "
              f"{r['screened'] - 2} | {', '.join(r['significant']) or 'none'} | {r['hit@1']} | {r['hit@5']} | "
              f"{fmt(r['precision@1'])} | {fmt(r['precision@5'])} | {s['unet_calls']:,}, {s['search_seconds']:.0f} | "
              f"{c.get('unet_calls', 0):,}, {c.get('search_seconds', 0):.0f} |")
    print("\n| domain | target | screen vs full audit: rho | full audit's significant (in the screen's top k) | "
          "B2T-style baseline: flipped images, top 5, P@1, P@5 |\n|---|---|---|---|---|")
    for r in rows:
        f, b = r["screen_vs_full"] or {}, r["baseline"] or {}
        rho = f.get("spearman_screen_vs_full")
        print(f"| {r['domain']} | {'balanced' if r['p'] == 0.2 else 'p = ' + str(r['p'])} | "
              f"{'-' if rho is None else f'{rho:.2f}'} | {', '.join(f.get('full_significant') or []) or 'none'} "
              f"({', '.join(f.get('full_significant_in_screen_top_k') or []) or 'none'}) | "
              f"{b.get('flipped_images')}/{b.get('of')}, {', '.join(b.get('ranking') or []) or '-'}, "
              f"{b.get('precision@1')}, {b.get('precision@5')} |")
    print("\n| domain | target | screen | rho vs full: confirmed rate (gap to null) | confirmed top k | "
          "significant | screening: UNet calls, s | free direction: red's rank (label kept), named |"
          "\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        for screen, x in r["screens"].items():
            f = ((r["screen_vs_full"] or {}).get("screens") or {}).get(screen, {})
            c, free = x["screening_cost"], r["free"] if x["free_direction"] else None
            print(f"| {r['domain']} | {'balanced' if r['p'] == 0.2 else 'p = ' + str(r['p'])} | {screen} | "
                  f"{f.get('rho_rate')} ({f.get('rho')}) | {', '.join(x['chosen']) or 'none'} | "
                  f"{', '.join(x['significant']) or 'none'} | {c['unet_calls']:,}, {c['search_seconds']:.0f} | "
                  + (f"{free['red_rank']} ({free['red_rank_label_kept']}) of {free['of']}, {', '.join(free['named'])} |"
                     if free else "- |"))


if __name__ == "__main__":
    main()
