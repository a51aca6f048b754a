"""``densessl`` command line: one subcommand per stage of the data flow.

User errors (recipe keys, missing files, bad values) print one ``error:`` line and exit 2;
a traceback means a bug in densessl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from densessl.errors import DensesslError


def _recipe_arg(value: str) -> str:
    from densessl.recipe import demo_recipe_path  # lazy: `densessl --help` stays fast

    return str(demo_recipe_path()) if value == "demo" else value


def cmd_pretrain(args) -> int:
    from densessl.workflows.pretraining import pretrain
    from densessl.workflows.validation import load_valid_recipe

    load_valid_recipe(_recipe_arg(args.recipe), args.set)  # every name, before out is touched
    metrics = pretrain(_recipe_arg(args.recipe), args.out, overrides=args.set,
                       resume=args.resume, overwrite=args.overwrite, validate=False)
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return 0  # one summary per run, from the process that wrote the outputs
    out = Path(args.out).resolve()
    if metrics.get("nothing_to_do"):
        print(f"nothing to do: {out} is already at step {metrics.get('steps')} = "
              "train.max_steps (raise train.max_steps to continue); nothing was changed")
        return 0
    final = metrics["final"]
    print(f"pretrained {metrics['steps']} steps: loss {final.get('loss', float('nan')):.4f}, "
          f"{metrics['pairs_per_s']:.1f} pairs/s, "
          f"{100 * metrics['data_wait_fraction']:.1f}% of time waiting on data")
    print(f"outputs in {out}: encoder.pt, encoder.json, metrics.json, recipe.yaml, "
          "checkpoints/last.ckpt")
    return 0


def cmd_finetune(args) -> int:
    from densessl.workflows.experiment import finetune

    controls: dict[str, list[str]] = {}
    for item in args.control or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DensesslError(f"--control {item!r}: expected NAME=encoder.pt (a name of "
                                "finetune.controls)")
        controls.setdefault(name, []).append(path)
    from densessl.workflows.validation import load_valid_recipe

    load_valid_recipe(_recipe_arg(args.recipe), args.set, pretraining=False)
    finetune(_recipe_arg(args.recipe), args.weights, args.out, overrides=args.set,
             label_free_weights=args.label_free_weights, control_weights=controls,
             force=args.force, validate=False)
    print(f"results in {Path(args.out).resolve()}: {_result_files(args.out)}")
    return 0


def _result_files(out) -> str:
    """The report files ``out`` holds (label_efficiency.png only with several fractions)."""
    names = ("results.json", "results.md", "results.png", "label_efficiency.png")
    return ", ".join(n for n in names if (Path(out) / n).is_file())


def cmd_run(args) -> int:
    from densessl.workflows.experiment import run
    from densessl.workflows.validation import load_valid_recipe

    load_valid_recipe(_recipe_arg(args.recipe), args.set)  # before any pretraining
    run(_recipe_arg(args.recipe), args.out, overrides=args.set, overwrite=args.overwrite,
        validate=False)
    print(f"results in {Path(args.out).resolve()}: {_result_files(args.out)} (pretraining "
          "outputs in pretrain/)")
    return 0


def cmd_sweep(args) -> int:
    from densessl.sweep import run_sweep

    rows = run_sweep(args.sweep, args.out, jobs=args.jobs, overrides=args.set)
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"results in {Path(args.out).resolve()}: results.csv, summary.csv, summary.md, plots/")
    return 1 if failed else 0


def cmd_export(args) -> int:
    from densessl.workflows.export import export_weights

    path = export_weights(args.weights, args.to, args.out, neck=args.neck,
                          overwrite=args.overwrite, force=args.force)
    print(f"wrote {path.resolve()} (model card: {path.name}.card.json, {path.name}.card.md)")
    return 0


def cmd_probe_artifacts(args) -> int:
    from densessl.eval.artifact_probe import run_probe_artifacts

    result = run_probe_artifacts(args.weights, args.data, args.artifact, args.out, n=args.n,
                                 image_size=args.image_size, seed=args.seed, alpha=args.alpha)
    share = result["share"]
    print(f"{result['artifact']}: {100 * share['all']:.1f} % of channels carry it ("
          + ", ".join(f"{k} {100 * share[k]:.1f} %" for k in result["levels"])
          + f"; probe accuracy >= {result['min_significant_accuracy']} on {result['n_test']} "
          "held-out images)")
    for r in result["channels"][:5]:
        print(f"  #{r['rank']} {r['stage']}[{r['channel']}]: accuracy {r['probe_accuracy']:.3f}, "
              f"shift {r['shift']:+.2f} sigma")
    out = Path(args.out).resolve()
    print(f"wrote {out}/artifacts.json, artifacts.md, artifacts.png")
    return 0


def cmd_inspect_pairs(args) -> int:
    from densessl.workflows.inspect_pairs import inspect_pairs

    if args.cells:
        from densessl.workflows.cell_budget import cell_budget, format_budget

        budget = cell_budget(_recipe_arg(args.recipe), args.set, count=args.n, seed=args.seed)
        print(format_budget(budget))
        if args.json:
            from densessl.io import write_json

            write_json(Path(args.json), {"pairs": args.n, "seed": args.seed,
                                         "overrides": args.set or [], "cells_per_image": budget})
        return 0
    if args.out is None:
        raise DensesslError("inspect-pairs: --out PNG is required (or --cells for the query-"
                            "cell budget)")
    path = inspect_pairs(_recipe_arg(args.recipe), args.out, overrides=args.set, count=args.n,
                         seed=args.seed)
    print(f"wrote {Path(path).resolve()}")
    return 0


def cmd_recipe(args) -> int:
    from densessl.recipe import dump_recipe
    from densessl.workflows.validation import load_valid_recipe

    # the Recipe validators, then every name the recipe gives (builder, source, datasets,
    # backbone) and smp's input-size rule, as pretrain / run meet them; no data are read
    recipe = load_valid_recipe(_recipe_arg(args.recipe), args.set)
    print(dump_recipe(recipe), end="")
    return 0


def cmd_builders(args) -> int:
    from densessl.pairs import available_pair_builders

    print(json.dumps(available_pair_builders()))
    return 0


def cmd_data_synth(args) -> int:
    from densessl.data import SYNTHESIZERS

    if args.kind not in SYNTHESIZERS:
        raise DensesslError(f"data synth: unknown kind {args.kind!r}; available: "
                            f"{', '.join(sorted(SYNTHESIZERS)) or 'none'}")
    root = SYNTHESIZERS[args.kind](Path(args.out), args.n, args.seed)
    print(f"wrote synthetic {args.kind} dataset to {Path(root).resolve()}")
    return 0


def cmd_data_inspect(args) -> int:
    import inspect

    from densessl.data import INSPECTORS

    if args.format not in INSPECTORS:
        raise DensesslError(f"data inspect: unknown --format {args.format!r}; available: "
                            f"{', '.join(sorted(INSPECTORS)) or 'none'}")
    root = Path(args.root)
    if not root.exists():
        raise DensesslError(f"data inspect: {str(root)!r} does not exist")
    options = _inspect_options(args.option)
    if options and not args.check:
        raise DensesslError("data inspect: --option sets the loader options --check builds the "
                            "loader with; add --check")
    # the inspector reads the options it has too (geotiff: pattern)
    inspector = INSPECTORS[args.format]
    accepted = inspect.signature(inspector).parameters
    report = inspector(root, **{k: v for k, v in options.items() if k in accepted and k != "root"})
    if args.manifest_root and not args.manifest:
        raise DensesslError("data inspect: --manifest-root needs --manifest")
    if args.manifest:
        from densessl.data.manifest import manifest_report
        from densessl.data.registry import PROVENANCE_LISTERS

        # licences, images without provenance, flagged images: the images the format's source
        # reads (xbd: pre/post images and their pairs), else every image file under ROOT
        files, items = (PROVENANCE_LISTERS[args.format](root)
                        if args.format in PROVENANCE_LISTERS else (None, None))
        report = {**report, "provenance": manifest_report(
            root, args.manifest, files, items, args.manifest_root)}
    if args.check:
        from densessl.data.check import check_files, loader_refusals

        # headers can be sound in a truncated file: decode every one; then the checks the
        # format's loader runs when pretraining / fine-tuning builds it (nodata, overlap,
        # band counts, CRS, annotations naming missing files)
        check = check_files(root, args.format)
        refused = loader_refusals(root, args.format, options)
        # "refused" only when there is any: {"files", "bad"} stays the report of clean data
        report = {**report, "check": {**check, **({"refused": refused} if refused else {})}}
    print(json.dumps(report, indent=2))
    if args.check and report["check"]["bad"]:
        bad = report["check"]["bad"]
        print(f"error: {len(bad)} of {report['check']['files']} files cannot be decoded, first: "
              f"{bad[0]}", file=sys.stderr)
        return 1
    if args.check and report["check"].get("refused"):
        refused = report["check"]["refused"]
        print(f"error: the {args.format} loader refuses this data ({len(refused)} problem"
              f"{'s' if len(refused) > 1 else ''}), first: {refused[0]}", file=sys.stderr)
        return 1
    return 0


def _inspect_options(pairs: list[str] | None) -> dict:
    """``--option KEY=VALUE`` (VALUE read as YAML, as in a recipe) → a dict."""
    import yaml

    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise DensesslError(f"data inspect --option {pair!r}: expected KEY=VALUE")
        try:
            options[key.strip()] = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            options[key.strip()] = value  # a regex, say: the text as it is
    return options


def cmd_data_stats(args) -> int:
    import yaml

    from densessl.build import build_pair_builder
    from densessl.recipe import load_recipe
    from densessl.workflows.data_settings import builder_bit_depth, sample_statistics

    recipe = load_recipe(_recipe_arg(args.recipe), args.set)
    builder = build_pair_builder(recipe)
    mean, std, pixels, pairs = sample_statistics(
        builder, args.samples, where=f"data stats {args.recipe}")
    depth = recipe.data.bit_depth if recipe.data.bit_depth != "auto" else builder_bit_depth(builder)
    # YAML to paste into the recipe: the scaling these statistics were computed after
    print(f"# densessl data stats: per-band mean / std over {pairs} samples ({pixels:,} valid "
          f"pixels, nodata excluded) of data.source {recipe.data.source!r}, "
          f"pairs.builder {recipe.pairs.builder!r}, after scaling by "
          f"{f'{depth} bits' if depth else 'the storage type'}")
    section = {"augment": {"mean": [round(m, 4) for m in mean],
                           "std": [round(s, 4) for s in std]}}
    if depth:
        section = {"data": {"bit_depth": depth}, **section}
    print(yaml.safe_dump(section, sort_keys=False, default_flow_style=None), end="")
    return 0


def cmd_bench(args) -> int:
    from densessl.bench import run_bench
    from densessl.io import write_json

    results = run_bench(backbone=args.backbone, image_size=args.image_size,
                        batch_size=args.batch_size, steps=args.steps, rounds=args.rounds,
                        device=args.device,
                        precision=args.precision, channels_last=args.channels_last,
                        builders=not args.skip_builders, data_wait=not args.skip_data_wait,
                        peak=args.peak_tflops, profile_dir=args.profile,
                        tiles=not args.skip_tiles, tiles_only=args.tiles_only)
    if args.json:
        write_json(args.json, results)
        print(f"wrote {Path(args.json).resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="densessl",
        description="Domain-specific dense contrastive pretraining (segmentation, detection).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_recipe(p):
        p.add_argument("recipe", help="recipe YAML (or 'demo' for the built-in demo recipe)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe key, e.g. --set train.max_steps=10")
        return p

    p = with_recipe(sub.add_parser("pretrain", help="dense contrastive pretraining"))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints/last.ckpt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run OUT already holds")
    p.set_defaults(func=cmd_pretrain)

    p = with_recipe(sub.add_parser("run", help="pretrain → fine-tune each init → results"))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results and pretraining runs OUT already holds")
    p.set_defaults(func=cmd_run)

    p = with_recipe(sub.add_parser("finetune", help="fine-tune from an encoder → results"))
    p.add_argument("--weights", default=None, nargs="+",
                   help="encoder.pt (the 'pretrained' init); several: one per seed")
    p.add_argument("--label-free-weights", default=None, nargs="+",
                   help="encoder.pt of the label-free control (the 'label_free' init)")
    p.add_argument("--control", action="append", metavar="NAME=ENCODER",
                   help="encoder.pt of control NAME of finetune.controls; repeat for one per "
                   "seed or for several controls")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true",
                   help="fine-tune even from a collapsed or non-finite encoder")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("sweep", help="grid of pretrain → fine-tune cells → results.csv + plots")
    p.add_argument("sweep", help="sweep YAML (base recipe + grid over recipe keys)")
    p.add_argument("--out", required=True, help="output folder (rerun to resume)")
    p.add_argument("--jobs", type=int, default=1, help="cells run in parallel processes")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key in every cell, e.g. --set train.max_steps=1000")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("export", help="encoder.pt → torchvision / smp / timm / detectron2")
    p.add_argument("weights", help="encoder.pt written by pretraining")
    p.add_argument("--to", required=True, choices=["torchvision", "smp", "timm", "detectron2"])
    p.add_argument("--out", required=True, help="file to write (.pt, or .pkl for detectron2)")
    p.add_argument("--neck", action="store_true",
                   help="include the FPN neck (torchvision detection backbone, detectron2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT file")
    p.add_argument("--force", action="store_true",
                   help="export even a collapsed or non-finite encoder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("probe-artifacts",
                       help="which encoder channels respond to a watermark / stamp / border")
    p.add_argument("weights", help="encoder.pt (encoder.json and recipe.yaml next to it give "
                   "the backbone and normalisation)")
    p.add_argument("--data", required=True, help="held-out images: a folder, a recipe YAML (its "
                   "data source) or a source name such as synthetic")
    p.add_argument("--artifact", required=True,
                   help="text, logo, border, none (the artifact-free control) or an RGBA .png")
    p.add_argument("--out", required=True, help="folder for artifacts.json/.md/.png")
    p.add_argument("-n", type=int, default=200, help="held-out images")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.05,
                   help="family-wise level of the 'carries the artifact' test")
    p.set_defaults(func=cmd_probe_artifacts)

    p = with_recipe(sub.add_parser("inspect-pairs", help="draw pairs with correspondences"))
    p.add_argument("--out", default=None, help="PNG file to write")
    p.add_argument("-n", type=int, default=4, help="number of pairs")
    p.add_argument("--cells", action="store_true",
                   help="print instead where the dense objective's query cells go: cells per "
                   "image left after each rule of the exact correspondence, over -n pairs "
                   "(use -n 64 or more)")
    p.add_argument("--json", default=None, help="with --cells: also write the budget here")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_inspect_pairs)

    p = with_recipe(sub.add_parser("recipe", help="validate a recipe and print it resolved"))
    p.set_defaults(func=cmd_recipe)

    p = sub.add_parser("builders", help="list registered pair builders")
    p.set_defaults(func=cmd_builders)

    data = sub.add_parser("data", help="synthesize or inspect datasets in real on-disk formats")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data_sub.add_parser("synth", help="write a synthetic dataset in a real format")
    p.add_argument("kind", help="what to synthesize (e.g. xray, xbd, geotiff)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=None, help="number of images (kind's default)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_synth)
    p = data_sub.add_parser("inspect", help="print a dataset summary as JSON")
    p.add_argument("root", help="dataset root")
    p.add_argument("--format", required=True,
                   help="dataset format (e.g. folder, pidray, sixray, xbd)")
    p.add_argument("--manifest", default=None,
                   help="attribution manifest (CSV/JSON, one row per image): also report "
                        "licence counts, images without provenance and flagged images")
    p.add_argument("--manifest-root", default=None,
                   help="the folder the manifest's rows are relative to, when it is not ROOT "
                        "(cut_paste: the folder holding both the PIDray and the SIXray root)")
    p.add_argument("--check", action="store_true",
                   help="decode every file (slow on large sets), and build the format's loader "
                        "as pretraining / fine-tuning does (without data.skip_bad): list the "
                        "files that cannot be decoded and every problem the loader refuses; "
                        "exit 1 when there are any")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="with --check: a loader option, as the recipe's data.options / "
                        "finetune.options (and data.image_size, data.channels) would set it, "
                        "e.g. --option pattern='(?P<place>.+)_(?P<date>\\d{8})\\.tif$' "
                        "--option image_size=64; repeatable")
    p.set_defaults(func=cmd_data_inspect)
    p = with_recipe(data_sub.add_parser(
        "stats", help="per-band mean / std of a recipe's data (nodata excluded), as YAML"))
    p.add_argument("--samples", type=int, default=64,
                   help="pairs read, spread evenly over the data (default 64)")
    p.set_defaults(func=cmd_data_stats)

    p = sub.add_parser("bench", help="pairs/s and peak memory vs a plain MoCo-v2 step")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds over all configurations (the median round is reported)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=["32", "bf16"], default="32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--skip-builders", action="store_true", help="skip builder throughput")
    p.add_argument("--skip-data-wait", action="store_true", help="skip the short real run")
    p.add_argument("--skip-tiles", action="store_true",
                   help="skip geotiff_tiles on a 10,980² 13-band scene (part of the builder "
                        "figures; the first run writes a 1.8 GB scene into the cache)")
    p.add_argument("--tiles-only", action="store_true",
                   help="only the geotiff_tiles figures (pairs/s per worker, peak RSS at two "
                        "scene sizes)")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's peak TFLOP/s for model FLOP utilisation (known: bf16 on "
                        "H100/H200/A100)")
    p.add_argument("--profile", metavar="DIR",
                   help="also write a torch.profiler trace and top-operator table per "
                        "configuration to DIR")
    p.set_defaults(func=cmd_bench)

    return parser


def _one_line(exc: Exception) -> str:
    """The message of ``exc``; an error raised in a DataLoader worker comes back with the
    worker's traceback in its message ("Caught DataError in DataLoader worker process 0.
    Original Traceback ..."): its last line is the original one-line message."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """densessl's own warnings (raised from inside the package) are addressed to the user: one
    line, without the source line Python's default format adds; other libraries' warnings keep
    their location."""
    if issubclass(category, UserWarning) and Path(filename).resolve().is_relative_to(_PACKAGE):
        return f"warning: {message}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


_default_formatwarning = warnings.formatwarning
_PACKAGE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _one_line_warning
    try:
        return int(args.func(args) or 0)
    except DensesslError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        # last resort: writes through densessl.io are an OutputError (a DensesslError) already;
        # this is a library writing its own file into a place the user chose (no permission,
        # a file in the way, read-only, disk full). Any other OSError keeps its traceback.
        from densessl.errors import WRITE_ERRNOS, os_error_line

        if exc.errno not in WRITE_ERRNOS:
            raise
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
