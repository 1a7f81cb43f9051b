"""`zoom` command line: demo, audit, report, compare, check, export, finetune, prompts.

Exit codes: 0 success, 1 a `check` that failed, 2 bad input (one line on stderr naming the problem and
the fix, no traceback, nothing half-written). Under several processes only the main one speaks.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from pathlib import Path

import click

from .errors import ZoomError, one_line, printable, shown_path

RANDOM_NOTICE = ("NOTE: this run's models are tiny and RANDOMLY initialised; every number below is meaningless. "
                 "They exist to test the machinery; `zoom demo` audits a trained model.")
SPEC_FORMS = ("torchvision:NAME[:WEIGHTS]  timm:NAME[:FILE]  hf:REPO_OR_FOLDER  torchscript:FILE.pt  "
              "python:MODULE_OR_FILE.py:CALLABLE")

_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


class ZoomGroup(click.Group):
    """Turns ZoomError (and click's own usage errors) into one line on stderr and exit code 2."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except ZoomError as e:
            if _is_main_process():
                click.echo(f"zoom: error: {one_line(str(e))}", err=True)
            sys.exit(2)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("zoom: aborted", err=True)
            sys.exit(130)
        except _NO_ARGS_IS_HELP as e:  # bare `zoom`: help, not an error
            click.echo(e.format_message())
            sys.exit(0)
        except click.ClickException as e:
            click.echo(f"zoom: error: {one_line(e.format_message())}", err=True)
            sys.exit(2)


def _default_out(prefix: str) -> str:
    return f"{prefix}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _print_report(report: dict, out) -> None:
    from .report import summary_table

    if report["run"].get("random_models"):
        click.echo(RANDOM_NOTICE)
    click.echo(summary_table(report))
    done = report.get("completeness") or {}
    if not done.get("complete", True):
        click.echo(f"incomplete: {done['finished']} of {done['expected']} items finished; the numbers cover only "
                   f"those. Finish it with `zoom audit --config ... --out {out} --resume`")
    if report["run"].get("random_models"):
        click.echo(RANDOM_NOTICE)
    click.echo(f"report: {Path(out).resolve() / 'report.html'}  (and report.json, report.csv)")


@click.group(cls=ZoomGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="zoom")
def main():
    """zoom: which attributes flip your vision model, how often, how easily, and the images that did it.

    \b
    Start here (offline, CPU, about a minute):
      zoom demo
    Audit a model:
      zoom audit --config default --target torchvision:resnet50:IMAGENET1K_V2 --prompts faces
    """


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory to create (default: ./zoom-demo-DATE-TIME).")
def demo(out):
    """A complete audit of a trained model in the shapes world, offline, on CPU.

    The world's models (a text-to-image pipeline, two CLIPs, oracles and a shape classifier trained
    with a spurious correlation) ship inside the package; the audit should find that correlation.
    """
    from .config import load_config
    from .runner import run_audit

    from .models import quiet_libraries

    quiet_libraries()
    out = out or _default_out("zoom-demo")
    config = load_config("demo")
    click.echo(config.description)
    report = run_audit(config, out)
    _print_report(report, out)


def num_processes_option(what: str):
    """--num-processes of the commands that run under `accelerate launch` (audit, finetune, discover)."""
    return click.option("--num-processes", type=click.IntRange(min=1), default=1, show_default=True,
                        help=f"Processes to {what}, through `accelerate launch`: one per GPU, or CPU processes.")


def _relaunch(num_processes: int) -> bool:
    """Whether this command must start its K processes (it is not one of them already)."""
    return num_processes > 1 and "WORLD_SIZE" not in os.environ


@main.command(epilog="""\b
Examples:
  zoom audit --config demo                                   # the shapes world, offline
  zoom audit --config default --target torchvision:resnet50:IMAGENET1K_V2 --prompts faces
  zoom audit --config default --target hf:/models/my-classifier --samples 128 --out runs/mine
  zoom audit --config default --out runs/mine --resume       # continue after a crash
  zoom audit --config default --num-processes 4              # 4 processes (GPUs, or CPU cores)
\b
Target specs: """ + SPEC_FORMS + """
Configs and prompt sets: a path, or a bundled name (`zoom prompts` lists them).""")
@click.option("--config", "config_path", required=True, metavar="NAME|FILE",
              help="Run config: a bundled name (demo, default, sd15, tiny) or a YAML file.")
@click.option("--target", metavar="SPEC", help="Model to audit (default: the config's target.spec).")
@click.option("--prompts", metavar="NAME|FILE", help="Attribute set (default: the config's prompts).")
@click.option("--samples", type=int, help="Seeds per attribute (default: the config's search.samples).")
@click.option("--seed", type=int, help="First seed; sample i uses seed + i (default: the config's search.seed).")
@click.option("--mode", type=click.Choice(["single", "joint", "sweep"]), help="Search mode (default: the config's).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Mixed precision (default: the config's; use fp32 on CPU).")
@click.option("--device", metavar="auto|cpu|cuda|cuda:N", help="Where to run (default: the config's device).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory to create (default: runs/audit-DATE-TIME).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out, skipping finished items.")
@click.option("--trust-remote-code", is_flag=True, help="Allow hf: targets to run code from their repository.")
@num_processes_option("run on")
def audit(config_path, target, prompts, samples, seed, mode, precision, device, out, resume, trust_remote_code,
          num_processes):
    """Audit a target model's sensitivity to the attributes of a prompt set."""
    from .config import load_config
    from .runner import prepare_run_dir, run_audit

    if resume and not out:
        raise ZoomError("--resume needs --out RUN_DIR: the run directory to continue")
    overrides = {"target.spec": target, "prompts": prompts, "search.samples": samples, "search.seed": seed,
                 "search.mode": mode, "precision": precision, "device": device,
                 "target.trust_remote_code": True if trust_remote_code else None}
    from .models import quiet_libraries

    quiet_libraries()
    config = load_config(config_path, overrides)
    out = out or os.path.join("runs", _default_out("audit"))
    if _relaunch(num_processes):
        prepare_run_dir(out, config, resume)  # bad input fails here, once, before K processes start
        args = ["audit", "--config", config_path, "--out", out]
        for flag, value in [("--target", target), ("--prompts", prompts), ("--samples", samples), ("--seed", seed),
                            ("--mode", mode), ("--precision", precision), ("--device", device)]:
            if value is not None:
                args += [flag, str(value)]
        args += ["--resume"] * resume + ["--trust-remote-code"] * trust_remote_code
        sys.exit(_launch(num_processes, config, args))
    report = run_audit(config, out, resume=resume)
    if report is not None:
        _print_report(report, out)


def _launch(num_processes: int, config, args: list[str]) -> int:
    """Re-run this command as K processes through accelerate's launcher; returns its exit code."""
    import subprocess

    import torch

    env = dict(os.environ)
    if config.device == "cpu" or not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # without it each CPU process would believe it is alone
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "zoom", *args]
    # The children print zoom's own one-line errors; accelerate's launcher would add its traceback.
    result = subprocess.run(command, env=env, stderr=subprocess.PIPE, text=True)
    own = [line for line in result.stderr.splitlines() if line.startswith(("zoom: ", "counterfactuals"))]
    if result.returncode == 0:
        sys.stderr.write(result.stderr)
    elif own:
        sys.stderr.write("\n".join(own) + "\n")
    else:
        sys.stderr.write(result.stderr)
    return 2 if result.returncode and any(line.startswith("zoom: error") for line in own) else result.returncode


@main.command(epilog="Example:\n\n  zoom report runs/mine")
@click.argument("run_dir", type=click.Path(file_okay=False))
def report(run_dir):
    """Rebuild report.json, report.csv and report.html of RUN_DIR from its records (no models needed)."""
    from .report import write_report
    from .rundir import check_path

    if not check_path(run_dir, "run directory") or not os.path.isdir(run_dir):
        raise ZoomError(f"run directory {shown_path(run_dir)} does not exist")
    _print_report(write_report(run_dir, lock=True), run_dir)


@main.command(epilog="""\b
Examples:
  zoom compare runs/resnet50-v1 runs/resnet50-v2                 # table: B - A per attribute
  zoom compare runs/resnet50-v1 runs/resnet50-v2 --json          # the same as JSON
  zoom compare runs/resnet50-v1 runs/resnet50-v2 --html cmp.html # and a self-contained page""")
@click.argument("run_a", type=click.Path())
@click.argument("run_b", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON instead of a table.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the comparison as a self-contained HTML page to this file.")
def compare(run_a, run_b, as_json, html_path):
    """Compare the flip rates of the same attributes in two runs (B - A), with a test per attribute."""
    import json

    from .compare import compare_runs, compare_table
    from .rundir import check_path

    if html_path:
        check_path(html_path, "--html")  # a name too long: said now, not after both runs are read
    if html_path and os.path.isdir(html_path):
        raise ZoomError(f"--html {shown_path(html_path)} is a directory; give a file name such as compare.html")
    if html_path and not Path(html_path).resolve().parent.is_dir():
        raise ZoomError(f"--html {shown_path(html_path)}: its folder does not exist")
    result = compare_runs(run_a, run_b)
    if html_path:
        from .report.html import render_compare
        from .rundir import atomic_write

        atomic_write(Path(html_path), render_compare(result))
    if as_json:
        click.echo(json.dumps(result, indent=1, allow_nan=False))
    else:
        click.echo(compare_table(result))
        if html_path:
            click.echo(f"html: {Path(html_path).resolve()}")


@main.command(epilog="""\b
Examples:
  zoom check runs/mine --max-flip-rate 0.2
  zoom check runs/mine --max-flip-rate 0.2 --attribute eyeglasses --attribute hat --json""")
@click.argument("run_dir", type=click.Path())
@click.option("--max-flip-rate", "max_flip_rate", required=True, metavar="R",
              help="Fail when exact tests show an attribute's confirmed flip rate above R (0..1) and above its "
                   "null control's.")
@click.option("--attribute", "attributes", multiple=True, metavar="NAME",
              help="Check only this attribute (repeatable); default: all.")
@click.option("--raw", is_flag=True, help="Count every flip, not only confirmed ones (the judge CLIP, and the oracle "
                                          "where configured, sees the attribute in the counterfactual).")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
def check(run_dir, max_flip_rate, attributes, raw, as_json):
    """A pre-deployment gate: exit 1 (and say why) when an attribute's flip rate is too high, else 0.

    An attribute fails when its confirmed flip rate is shown above R and above its null control's; a null
    control fails when its own flip rate is shown above R (the model flips on meaningless edits); a failed
    item counts as a flip of its attribute. When no checked attribute truly flips more often than R (or
    than its null control) and no null control more often than R, the gate fails a run at most 5% of the
    time, however many attributes are checked.
    """
    import json

    from .check import check_run, check_text

    result = check_run(run_dir, max_flip_rate, list(attributes) or None, raw)
    click.echo(json.dumps(result, indent=1, allow_nan=False) if as_json else check_text(result))
    if not result["passed"]:
        sys.exit(1)


@main.command(epilog="""\b
Examples:
  zoom export runs/mine --out data/mine-cf                       # every finished counterfactual
  zoom export runs/mine --out data/mine-flips --flipped-only --valid-only --attribute red
\b
Load it with:  datasets.load_dataset("imagefolder", data_dir="data/mine-cf")""")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(), metavar="RUN_DIR...")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to create (must not exist).")
@click.option("--flipped-only", is_flag=True, help="Only counterfactuals that flipped the target.")
@click.option("--valid-only", is_flag=True, help="Only counterfactuals in which the judge CLIP sees the attribute "
                                                 "(the record's validity).")
@click.option("--confirmed-only", is_flag=True, help="Only confirmed flips (the report's rule: the judge CLIP, and the "
                                                     "oracle where configured, sees the attribute beyond the null's).")
@click.option("--attribute", "attributes", multiple=True, metavar="NAME", help="Only this attribute (repeatable).")
def export(run_dirs, out, flipped_only, valid_only, confirmed_only, attributes):
    """Write the base and counterfactual images of finished runs as a Hugging Face `datasets` image folder.

    DIR/metadata.jsonl has one row per image: file_name, kind (base or counterfactual), label and
    label_id (the base image's label, which a counterfactual keeps), attribute, prompt, flipped,
    confirmed, strength, validity, final_label, seed, key, run. Null-control edits are not exported.
    """
    from .export import export_runs

    done = export_runs(list(run_dirs), out, flipped_only=flipped_only, attributes=list(attributes) or None,
                       valid_only=valid_only, confirmed_only=confirmed_only)
    click.echo(f"exported {done['bases']} base images and {done['counterfactuals']} counterfactuals to "
               f"{Path(done['out']).resolve()}" + (f" ({done['missing']} items skipped: image missing)"
                                                   if done["missing"] else ""))


@main.command(epilog="""\b
Examples:
  zoom finetune --target hf:models/mine --runs runs/mine --out models/mine-cf
  zoom finetune --target hf:models/mine --runs runs/a --runs runs/b --out models/mine-cf --num-processes 4
  zoom audit --config default --target hf:models/mine-cf ...     # audit the result
\b
An attribute that should change the label is marked in its prompt file and never used:
  - name: glasses-off
    prompt: "..."
    changes_label: true""")
@click.option("--target", "target_spec", required=True, metavar="SPEC", help="The hf: target to fine-tune.")
@click.option("--runs", "runs", required=True, multiple=True, type=click.Path(), metavar="RUN_DIR",
              help="A finished audit of this target (repeatable).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model folder to create (hf: format).")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True,
              help="Images per step over all processes: half base images, half counterfactuals.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-5, show_default=True,
              help="AdamW learning rate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the batch draws.")
@click.option("--flipped-only", is_flag=True, help="Train only on counterfactuals that flipped the target.")
@click.option("--valid-only", is_flag=True, help="Train only on counterfactuals the judge CLIP validated.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Mixed precision on GPU (CPU always runs fp32).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Steps between checkpoints (in .MODEL_DIR.partial/ until the end).")
@click.option("--resume", is_flag=True, help="Continue an interrupted fine-tune of --out from its checkpoint.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the hf: target to run code from its repository.")
@num_processes_option("train on")
def finetune(target_spec, runs, out, steps, batch_size, lr, seed, flipped_only, valid_only, precision, device,
             checkpoint_every, resume, trust_remote_code, num_processes):
    """Fine-tune a target on its counterfactuals: each keeps its base image's label, mixed with the bases.

    Attributes marked `changes_label: true` in the run's prompt file are left out (and named). The
    result is saved like any transformers classifier; audit it with --target hf:MODEL_DIR.
    """
    from types import SimpleNamespace

    from .finetune import finetune as run_finetune
    from .finetune import gather, prepare_out, trainable_target
    from .models import quiet_libraries

    quiet_libraries()
    if _relaunch(num_processes):
        prepare_out(out, resume)  # bad input fails here, once, before K processes start
        target, _ = trainable_target(target_spec, trust_remote_code)
        gather(list(runs), target.labels, flipped_only=flipped_only, valid_only=valid_only)
        args = ["finetune", "--target", target_spec, "--out", out, "--steps", str(steps), "--batch-size",
                str(batch_size), "--lr", repr(lr), "--seed", str(seed), "--precision", precision, "--device", device,
                "--checkpoint-every", str(checkpoint_every)]
        for run in runs:
            args += ["--runs", run]
        args += ["--flipped-only"] * flipped_only + ["--valid-only"] * valid_only + ["--resume"] * resume
        args += ["--trust-remote-code"] * trust_remote_code
        sys.exit(_launch(num_processes, SimpleNamespace(device=device), args))
    summary = run_finetune(target_spec, list(runs), out, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                           precision=precision, device=device, checkpoint_every=checkpoint_every, resume=resume,
                           flipped_only=flipped_only, valid_only=valid_only, trust_remote_code=trust_remote_code,
                           progress=lambda text: click.echo(text, err=True))
    if _is_main_process():
        for name, why in sorted(summary["left_out"].items()):
            click.echo(f"left out {printable(name)!r}: {why}")
        click.echo(f"trained {summary['steps']} steps on {summary['bases']} base images and "
                   f"{summary['counterfactuals']} counterfactuals in {summary['seconds']:.0f} s")
        click.echo(f"target spec: {summary['spec']}")


@main.command(epilog="""\b
Examples:
  zoom discover --config demo --vocabulary world --out runs/found     # the shapes world, offline
  zoom discover --config demo --vocabulary my_words.yaml --budget 2000 --out runs/found
  zoom discover --config demo --out runs/found --resume               # continue after a crash
  zoom discover --config demo --screen gradient --free-direction --out runs/found   # see the README
  zoom discover --config demo --out runs/found --num-processes 4      # 4 processes (GPUs, or CPU cores)
  zoom audit --config demo --prompts runs/found/discovered.yaml       # audit what it found
\b
Vocabularies: a bundled name (world, faces, objects, scenes, imagenet_x) or a YAML file of word
categories and phrases (README.md, "Discovering attributes", documents the format).""")
@click.option("--config", "config_path", required=True, metavar="NAME|FILE",
              help="Run config: its generator, CLIPs, target and the prompt set whose domain (and null) is used.")
@click.option("--vocabulary", default="world", show_default=True, metavar="NAME|FILE",
              help="Words and phrases to propose attributes from.")
@click.option("--target", metavar="SPEC", help="Model to audit (default: the config's target.spec).")
@click.option("--prompts", metavar="NAME|FILE", help="Prompt set giving the domain and null (default: the config's).")
@click.option("--budget", type=int, default=None, metavar="N",
              help="Most counterfactuals to spend (screening and confirmation, each with its null twin); "
                   "the screening seeds are cut to fit (the gradient screen makes none).")
@click.option("--screen-samples", type=int, default=8, show_default=True, help="Screening seeds per proposal.")
@click.option("--samples", type=int, help="Fresh confirmation seeds per attribute (default: the config's search.samples).")
@click.option("--top-k", type=int, default=5, show_default=True, help="Proposals confirmed.")
@click.option("--screen", default="bracket", show_default=True, metavar="bracket|gradient",
              help="How proposals are screened: a few-point bracket search of each (with null twins), or the "
                   "margin's gradient along each direction (one backward pass per screening seed).")
@click.option("--free-direction", is_flag=True,
              help="Also optimise a free direction that flips the target and mark the proposals nearest to it.")
@click.option("--seed", type=int, help="First screening seed; confirmation seeds follow them (default: the config's).")
@click.option("--device", metavar="auto|cpu|cuda|cuda:N", help="Where to run (default: the config's device).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Directory to create (default: runs/discover-DATE-TIME).")
@click.option("--resume", is_flag=True, help="Continue an interrupted discovery in --out.")
@num_processes_option("run the audits on")
def discover(config_path, vocabulary, target, prompts, budget, screen_samples, samples, top_k, screen, free_direction,
             seed, device, out, resume, num_processes):
    """Find attributes that flip the target: propose from a vocabulary, screen cheaply, confirm the best."""
    from .discover import discover as run_discovery

    if resume and not out:
        raise ZoomError("--resume needs --out DIR: the discovery to continue")
    if budget is not None and budget < 1:
        raise ZoomError(f"--budget must be a positive number of counterfactuals, got {budget}")
    out = out or os.path.join("runs", _default_out("discover"))
    if _relaunch(num_processes):
        from .config import load_config

        # a bad config fails here, once; the rest of discover's bad input fails alike on every process, said by one
        config = load_config(config_path, {"target.spec": target, "prompts": prompts, "device": device})
        args = ["discover", "--config", config_path, "--vocabulary", vocabulary, "--screen-samples",
                str(screen_samples), "--top-k", str(top_k), "--screen", screen, "--out", out]
        for flag, value in [("--target", target), ("--prompts", prompts), ("--budget", budget), ("--samples", samples),
                            ("--seed", seed), ("--device", device)]:
            if value is not None:
                args += [flag, str(value)]
        args += ["--free-direction"] * free_direction + ["--resume"] * resume
        sys.exit(_launch(num_processes, config, args))
    run_discovery(config_path, out, vocabulary=vocabulary, prompts=prompts, target_spec=target, seed=seed,
                  samples=samples, screen_samples=screen_samples, top_k=top_k, budget=budget, screen=screen,
                  free_direction=free_direction, device=device, resume=resume, echo=click.echo)
    if not _is_main_process():
        return
    click.echo((Path(out) / "discover.md").read_text(encoding="utf-8").rstrip())
    click.echo(f"report: {Path(out).resolve() / 'discover.html'}  (and discover.json, discover.md)")


@main.command(name="prompts")
def list_prompts():
    """List the bundled prompt sets (with their attributes) and configs."""
    from .prompts import bundled, load_prompts

    click.echo("Prompt sets (--prompts NAME):")
    for name, path in bundled("prompts").items():
        ps = load_prompts(path)
        click.echo(f"  {name:<11} {printable(ps.domain)!r}: {', '.join(printable(a.name) for a in ps.attributes)}")
    click.echo("Configs (--config NAME):")
    for name, path in bundled("configs").items():
        first = next((line[1:].strip() for line in Path(path).read_text(encoding="utf-8").splitlines()
                      if line.startswith("#")), "")
        click.echo(f"  {name:<11} {first}")


if __name__ == "__main__":
    main()
