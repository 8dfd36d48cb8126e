"""Evaluate a PaddleOCR-VL checkpoint on a prepared split: CER / exact match under every normalization.

    python evaluate_model.py --model_path PaddlePaddle/PaddleOCR-VL --split test
    python evaluate_model.py --model_path ./runs/ft/checkpoint-best --num_samples 500
    python evaluate_model.py --compare base/metrics.json ft/metrics.json --output_dir ./eval_output

Writes predictions.jsonl (flushed after every chunk, so a crash or Ctrl-C keeps what was produced),
then, at the end, metrics.json, summary.md and report.html (a self-contained page: tables, charts, the worst
crops with their images and character differences marked). An output folder holds one run: run.json records
its settings; the same command run again continues from the predictions already written, other settings
start the folder over (saying so), and the summary files exist only once the run is complete.
--compare of two runs also writes comparison.html (the crops the second model fixed and broke), which needs
each run's predictions.jsonl beside its metrics.json. Bad input (unknown model, broken JSONL, unreadable
image, empty split) ends with one `error: ...` line on stderr and exit code 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paddleocr_vl_manga.data.dataset import DatasetError, OCRDataset, RecordCrops, spread_sample
from paddleocr_vl_manga.evaluate.metrics import (
    NORMALIZATIONS,
    STOPS,
    all_metrics,
    confidence_groups,
    confidence_missing,
    edit_distance,
    normalize,
    stop_counts,
)
from paddleocr_vl_manga.evaluate.report import write_comparison, write_report
from paddleocr_vl_manga.model.output_vocabulary import head_line, head_size
from paddleocr_vl_manga.model.quantize import METHODS as QUANTIZE_METHODS
from paddleocr_vl_manga.model.vision_runtime import RUNTIMES as VISION_RUNTIMES

METRICS = {"cer": "CER", "cer_mean": "mean CER", "exact_match": "exact match"}
RUN_FILE = "run.json"  # the settings of the run the folder holds, and whether it is complete
PREDICTIONS = "predictions.jsonl"
CHANGED = {"model_files": "the model's files changed", "data_file_sha256": "the JSONL changed",
           "crop_ids_sha256": "other crops"}  # how start_run names a change of the settings' long values
RESULTS = ("metrics.json", "summary.md", "report.html")  # written once a run is complete
# --compare says a CER is not a plain win when this share of a run's answers or more is empty: an empty
# answer scores CER 100 %, far below a wrong long one (1077 % -> 98 % with 125 of 209 answers empty).
EMPTY_NOTE_SHARE = 0.05


class EvalError(Exception):
    """Bad arguments or input; printed as one line, without traceback."""


class Interrupted(Exception):
    """Ctrl-C during generation; the message says how many predictions were kept."""


def arg(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class EvalArguments:
    model_path: str | None = arg(None, "Hub id or local folder of the model (and processor) to evaluate.")
    data_dir: str = arg("./data/manga109s", "Folder with <split>.jsonl (prepare_manga109_data.py).")
    split: str = arg("test", "Which JSONL to evaluate: train, val or test.")
    num_samples: int | None = arg(
        None, "Evaluate a subset of this size, spread over every book of the split as evenly as the count "
        "allows, at random within a book (--seed); training's CER sample is drawn the same way. Default: the "
        "whole split.")
    sampling: str = field(default="books", metadata={
        "help": "How --num_samples draws: books (spread over every book, as training's CER sample) or "
        "random (random.Random(seed).sample over the file's records: the seed project's procedure).",
        "choices": ["books", "random"]})
    max_length: int | None = arg(
        None, "Leave out crops longer than this many tokens (prompt + image tokens + reference answer), "
        "counted as training counts them (e.g. the run's --max_length). Default: evaluate every crop.")
    batch_size: int = arg(16, "Crops per generate() call.")
    num_workers: int | None = arg(
        None, "Loader processes that decode and preprocess the next crops while the model generates. "
        "Default: 2 on CUDA (one core left to the main process), 0 on CPU, where generation already uses "
        "every core.")
    output_dir: str | None = arg(
        None, "Where predictions.jsonl, metrics.json, summary.md and report.html go; the folder holds one "
        "run: the same command continues an interrupted run there, other settings start it over. Default: "
        "<model_path>/eval_<split> for a local model, else ./eval_output/<model name>_<split>.")
    max_new_tokens: int | None = arg(
        None, "Token cap of every crop's answer, at least 1. Default: each crop's own, from its size (16 + "
        "one token per 100 px, at most 256); the report counts answers that hit their cap or looped "
        "(stopped, repeats cut), and empty answers.")
    seed: int = arg(42, "Seed of the --num_samples subset.")
    worst: int = arg(20, "List this many worst predictions (most edits).")
    min_pixels: int | None = arg(None, "Override the image processor's min_pixels (default: checkpoint's); "
                                 "at most max_pixels.")
    max_pixels: int | None = arg(None, "Override the image processor's max_pixels (default: checkpoint's); "
                                 "at least min_pixels.")
    quantize: str | None = field(default=None, metadata={
        "help": "int8 linear layers on the CPU (model/quantize.py): int8 (everywhere) or int8-text (the "
        "language model only). Default: bf16 on a GPU, fp32 on the CPU. Compare with an fp32 run through "
        "--compare.", "choices": list(QUANTIZE_METHODS)})
    full_vocabulary: bool = arg(
        False, "Compute lm_head over the whole vocabulary even where the model folder has an "
        "output_vocabulary.json (default: only the token ids training's labels used, exact whenever the full "
        "model's greedy choice is among them).")
    vision_runtime: str | None = field(default=None, metadata={
        "help": "Run the vision tower on this CPU runtime (model/vision_runtime.py; an optional package: pip "
        "install openvino / onnxruntime), int8 with --quantize int8. Default: torch.",
        "choices": list(VISION_RUNTIMES)})
    trust_remote_code: bool = arg(False, "Allow the checkpoint's own code (not needed for PaddleOCR-VL).")
    compare: list[str] | None = arg(
        None, "Instead of evaluating: print a side-by-side table of these metrics.json files. With "
        "--output_dir, also write comparison.md there and, for exactly two files, comparison.html (crops the "
        "second model fixed and broke; needs each run's predictions.jsonl beside its metrics.json).")


def device_description(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def default_output_dir(model_path: str, split: str) -> Path:
    if os.path.isdir(model_path):
        return Path(model_path) / f"eval_{split}"
    return Path("eval_output") / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', model_path).strip('_')}_{split}"


def select_records(args: EvalArguments) -> tuple[OCRDataset, int, str]:
    path = Path(args.data_dir).resolve() / f"{args.split}.jsonl"
    ds = OCRDataset(path)
    if not ds.records:
        raise EvalError(f"{path} has no records (empty split)")
    total = len(ds)
    if args.num_samples is not None and args.num_samples <= 0:
        raise EvalError(f"--num_samples must be positive, got {args.num_samples}")
    if args.num_samples is not None and args.sampling == "random" and args.num_samples < total:
        ds.records = random.Random(args.seed).sample(ds.records, args.num_samples)  # the seed's: unfiltered
    missing = [r for r in ds.records if not os.path.isfile(r["image_path"])]
    if missing:  # a stat per crop is cheap; finding a missing crop after the model load or mid-run is not
        r = missing[0]
        raise EvalError(f"{path}:{r['_line']}: image {r['image_path']} not found ({len(missing)} missing)")
    return ds, total, str(path)


def sample_books(ds: OCRDataset, args: EvalArguments) -> None:
    """--sampling books draws from the crops that pass --max_length, as training draws its CER sample from
    the filtered val (same sampler, same seed: the same crops)."""
    if args.num_samples is not None and args.sampling == "books":
        ds.records = spread_sample(ds.records, args.num_samples, args.seed)


def predict_records(model: Any, processor: Any, records: list[dict], source: str, out_path: Path,
                    args: EvalArguments, done: list[dict] | None = None) -> list[dict]:
    """Generate in chunks and append each chunk's rows to predictions.jsonl as soon as it is done.

    `done`: rows an interrupted run of the same settings wrote (already in the file); their crops are not
    generated again. args.num_workers loader processes decode and preprocess the next batches meanwhile
    (crop_chunks)."""
    from contextlib import closing

    from tqdm import tqdm

    import paddleocr_vl_manga.model.generation as ocr_generation
    from paddleocr_vl_manga.data.collator import num_image_tokens

    # Sorting the whole split by image-token count (JSONL width/height, else the file's header: nothing is
    # decoded) keeps batch padding small; a prediction does not depend on which batch it is in (tested). A
    # crop the processor would refuse is counted padded into shape (fit_image), as generation pads it.
    rows: list[dict] = list(done or [])
    finished = {r["id"] for r in rows}
    records = [r for r in records if r["id"] not in finished]
    sizes = RecordCrops(records, source)
    order = sorted(range(len(records)), key=lambda i: num_image_tokens(processor, *sizes.size(i)))
    crops = RecordCrops([records[i] for i in order], source)
    chunks = ocr_generation.crop_chunks(processor, crops, batch_size=args.batch_size,
                                   chunk_size=8 * args.batch_size, num_workers=args.num_workers,
                                   pin_memory=ocr_generation.pin_memory(model, args.num_workers))
    with (open(out_path, "a", encoding="utf-8") as f, closing(chunks),
          tqdm(total=len(crops) + len(finished), initial=len(finished), unit="crop", desc="eval") as bar):
        try:
            for chunk in chunks:
                # Looked up on the module at each call (tests interrupt a chunk through it).
                readings = ocr_generation.generate_readings(model, processor, chunk,
                                                       max_new_tokens=args.max_new_tokens)
                for i, reading in zip(chunk.positions, readings, strict=True):
                    rec = crops.records[i]
                    ref = rec["text"]
                    rows.append({"id": rec["id"], "image": rec["image_path"], "book": rec.get("book", ""),
                                 "orientation": rec.get("orientation", ""), "reference": ref,
                                 "prediction": reading.text,
                                 "edits": edit_distance(normalize(reading.text), normalize(ref)),
                                 "stop": reading.stop, "confidence": round(reading.confidence, 6),
                                 "min_probability": round(reading.min_probability, 6)})
                    f.write(json.dumps(rows[-1], ensure_ascii=False) + "\n")
                f.flush()
                bar.update(len(chunk.positions))
        except DatasetError as e:
            raise EvalError(f"{e}; {len(rows)} predictions already written to {out_path}") from None
        except KeyboardInterrupt:
            raise Interrupted(f"{len(rows)} predictions written to {out_path}; the same command continues "
                              "from there") from None
    return rows


def breakdown(rows: list[dict], key: str) -> dict[str, dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r[key] or "(unknown)"].append(r)
    return {g: all_metrics([r["prediction"] for r in rs], [r["reference"] for r in rs])
            for g, rs in sorted(groups.items())}


def confidence_halves(rows: list[dict]) -> dict:
    """The lines ranked by confidence and split in two: CER, exact match and stop reasons of the more
    confident half against the less confident one (the extra line of an odd count goes to the top half).
    If confidence means something, the top half reads better and holds the cap and loop stops.
    {"missing": why} when the predictions carry no confidence (a run continued from an older version)."""
    why = confidence_missing(rows)
    if why:
        return {"missing": why}
    top, bottom = confidence_groups(rows, 2) if len(rows) > 1 else (*confidence_groups(rows, 1), None)
    return {"statistic": "geometric mean token probability", "top_half": top, "bottom_half": bottom}


def confidence_lines(res: dict) -> list[str]:
    conf = res.get("confidence")
    if conf is None:  # a metrics.json from before confidence was measured
        return []
    lines = ["## By confidence (normalization: none)", ""]
    if "missing" in conf:
        return [*lines, f"Missing: {conf['missing']}.", ""]
    lines += ["Lines ranked by confidence (the geometric mean probability of their tokens) and split at the "
              "median.", "", md_row("half", "crops", "confidence", "CER", "exact match", *STOPS),
              md_row("---", *["---:"] * 7)]
    for name in ("top_half", "bottom_half"):
        g = conf[name]
        if g:
            lines.append(md_row(name.replace("_", " "), g["n"],
                                f"{g['confidence_min']:.3g}–{g['confidence_max']:.3g}", pct(g["cer"]),
                                pct(g["exact_match"]), *(g["stops"][k] for k in STOPS)))
    return [*lines, ""]


def empty_answers(rows: list[dict]) -> int:
    """Answers with no text (whitespace only counts as none): CER counts each as deleting the reference."""
    return sum(not r["prediction"].strip() for r in rows)


def pct(v: float) -> str:
    return f"{100 * v:.2f} %"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "⏎") or "∅"


def md_row(*cells: object) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def group_table(title: str, groups: dict[str, dict]) -> list[str]:
    lines = [f"## By {title} (normalization: none)", "", md_row(title, "crops", *METRICS.values()),
             md_row("---", *["---:"] * 4)]
    for g, m in groups.items():
        lines.append(md_row(cell(g), m["none"]["n"], *(pct(m["none"][k]) for k in METRICS)))
    return [*lines, ""]


def summary_markdown(res: dict) -> str:
    subset = f"random subset, seed {res['seed']}" if res["num_samples"] < res["split_size"] else "whole split"
    lines = [f"# {res['model_path']} on {res['split']}", "",
             f"{res['num_samples']} of {res['split_size']} crops ({subset}) from `{res['data_file']}`; batch "
             f"size {res['batch_size']}, {res['device']}, {res['seconds']:.1f} s "
             f"({res['crops_per_second']:.2f} crops/s)"
             + (f"; {res['continued_from']} predictions came from an interrupted run of the same settings."
                if res.get("continued_from") else "."), "",
             f"**CER {pct(res['metrics']['none']['cer'])}, exact match "
             f"{pct(res['metrics']['none']['exact_match'])}** (normalization none, the headline).", "",
             *stops_line(res),
             md_row("normalization", *METRICS.values(), "edits / reference chars"),
             md_row("---", *["---:"] * 4)]
    for mode, m in res["metrics"].items():
        lines.append(md_row(mode, *(pct(m[k]) for k in METRICS), f"{m['edits']} / {m['ref_chars']}"))
    lines += ["", *group_table("book", res["by_book"]), *group_table("orientation", res["by_orientation"])]
    lines += confidence_lines(res)
    lines += [f"## Worst {len(res['worst'])} (most edits, normalization: none)", "",
              md_row("id", "edits", "reference", "prediction"), md_row("---", "---:", "---", "---")]
    for w in res["worst"]:
        lines.append(md_row(cell(w["id"]), w["edits"], cell(w["reference"]), cell(w["prediction"])))
    return "\n".join(lines) + "\n"


def stops_line(res: dict) -> list[str]:
    """Lines on answers that did not end by themselves (cap or loop), their text cut short, and on empty
    answers (each scores CER 100 %, which a model that answers nothing can pass for a low CER); if any."""
    stops, n = res.get("stops", {}), max(res["num_samples"], 1)
    lines = []
    if stops.get("cap") or stops.get("loop"):
        cap = "its own cap" if res["max_new_tokens"] is None else f"the cap of {res['max_new_tokens']} tokens"
        lines += [f"Answers cut short: {pct(stops['cap'] / n)} hit {cap} ({stops['cap']}), "
                  f"{pct(stops['loop'] / n)} were stopped looping, repeats cut ({stops['loop']}).", ""]
    if res.get("empty_answers"):
        lines += [f"Empty answers: {pct(res['empty_answers'] / n)} ({res['empty_answers']} of "
                  f"{res['num_samples']}), each counted as CER 100 %.", ""]
    return lines


def load_runs(paths: list[str]) -> tuple[list[dict], list[str]]:
    """The metrics.json files of --compare, and a label for each (the model, plus the file when ambiguous)."""
    if len(paths) < 2:
        raise EvalError("--compare needs at least two metrics.json files")
    runs = []
    for p in paths:
        try:
            run = json.loads(Path(p).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EvalError(f"--compare: cannot read {p}: {e}") from None
        if not isinstance(run, dict) or not {"metrics", "model_path", "split"} <= run.keys():
            raise EvalError(f"--compare: {p} is not a metrics.json written by evaluate_model.py")
        runs.append(run)
    labels = [r["model_path"] for r in runs]
    if len(set(labels)) < len(labels):  # the same model twice (e.g. two splits): the file tells them apart
        labels = [f"{lab} ({p})" for lab, p in zip(labels, paths, strict=True)]
    return runs, labels


def read_predictions(metrics_path: str) -> list[dict]:
    """The predictions.jsonl beside a metrics.json: the comparison page needs every crop, not the worst."""
    path = Path(metrics_path).parent / "predictions.jsonl"
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError:
        raise EvalError(f"--compare: {path} not found; the comparison page needs each run's "
                        "predictions.jsonl beside its metrics.json") from None
    except ValueError as e:
        raise EvalError(f"--compare: {path} is not valid JSONL ({e})") from None
    if not all(isinstance(r, dict) and {"id", "reference", "prediction", "edits"} <= r.keys() for r in rows):
        raise EvalError(f"--compare: {path} is not a predictions.jsonl written by evaluate_model.py")
    return rows


def compare_markdown(runs: list[dict], labels: list[str]) -> str:
    two = len(runs) == 2
    lines = [md_row("metric", "normalization", *map(cell, labels), *(["Δ (2nd − 1st)"] if two else [])),
             md_row("---", "---", *["---:"] * (len(runs) + two))]
    for key, name in METRICS.items():
        for mode in NORMALIZATIONS:
            # A metrics.json written before a normalization was added has no value for it: shown as "–".
            vals = [r["metrics"].get(mode, {}).get(key) for r in runs]
            known = None not in vals
            delta = [f"{100 * (vals[1] - vals[0]):+.2f} pp" if known else "–"] if two else []
            lines.append(md_row(name, mode, *(pct(v) if v is not None else "–" for v in vals), *delta))
    lines.append(md_row("crops", "", *(f"{r.get('num_samples')} ({r['split']})" for r in runs), *[""] * two))
    shares = [r["empty_answers"] / max(r["num_samples"], 1) if "empty_answers" in r else None for r in runs]
    delta = ([f"{100 * (shares[1] - shares[0]):+.2f} pp" if None not in shares else "–"] if two else [])
    lines.append(md_row("empty answers", "", *(pct(s) if s is not None else "–" for s in shares), *delta))
    for label, run, share in zip(labels, runs, shares, strict=True):
        if share is not None and share >= EMPTY_NOTE_SHARE:
            lines += ["", f"Note: {cell(label)} answered nothing on {pct(share)} of its crops "
                      f"({run['empty_answers']} of {run['num_samples']}). An empty answer scores CER 100 %, "
                      "far below a wrong long answer, so its CER is no plain measure of reading: check its "
                      "predictions before calling a lower CER a win."]
    if len({(r["split"], r.get("num_samples"), r.get("seed"), r.get("data_file")) for r in runs}) > 1:
        lines += ["", "Note: these runs did not evaluate the same crops (split, subset or data differ), "
                  "so the differences mix model and data effects."]
    return "\n".join(lines) + "\n"


def run_settings(args: EvalArguments, records: list[dict], source: str, processor: Any, dtype: str,
                 lm_head: str) -> dict:
    """Everything a prediction depends on. Batch size and loader workers are left out: predictions do not
    depend on them (tests/evaluate/test_evaluate.py), so a rerun may change them and still continue."""
    def files(folder: Path, patterns: tuple[str, ...]) -> dict[str, str]:
        # contents, not file times: a model downloaded or copied again (a restarted spot job) has new times
        # and is the same model. Just loaded, so read from the page cache: 1.9 GB in about 2 s (sha256).
        found = sorted(p for pattern in patterns for p in folder.glob(pattern))
        return {p.name: sha256_file(p) for p in found}

    model = Path(args.model_path).expanduser()
    size = processor.image_processor.size
    return {
        "model_path": str(model.resolve()) if model.is_dir() else args.model_path,
        # a model retrained into the same folder is another model, and so is a hub id's new revision
        "model_files": files(model if model.is_dir() else hub_snapshot(args.model_path),
                             ("config.json", "*.safetensors")),
        "data_file": source, "data_file_sha256": files(Path(source).parent, (Path(source).name,)),
        "crops": len(records),
        "crop_ids_sha256": hashlib.sha256("\n".join(r["id"] for r in records).encode()).hexdigest(),
        "max_new_tokens": args.max_new_tokens, "min_pixels": size["shortest_edge"],
        "max_pixels": size["longest_edge"], "dtype": dtype, "lm_head": lm_head,
    }


def hub_snapshot(model_id: str) -> Path:
    """The local snapshot folder a hub id was just loaded from (its revision's files), found in the cache
    without asking the hub."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(model_id, "config.json")
    return Path(config).parent if isinstance(config, str) else Path(os.devnull)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def start_run(out_dir: Path, settings: dict) -> list[dict]:
    """Make out_dir hold this run only; return the predictions an interrupted run of the same settings
    already wrote (the rest is generated and appended). Results of any earlier run are removed first, so
    an interrupted run never leaves an old metrics.json beside new predictions."""
    state_path, pred_path = out_dir / RUN_FILE, out_dir / PREDICTIONS
    try:
        before = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        before = None
    done: list[dict] = []
    if isinstance(before, dict) and before.get("settings") == settings and pred_path.is_file():
        wanted = set()  # ids of this run's crops; a torn last line (a killed write) is dropped
        for line in pred_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "id" in row and "prediction" in row and row["id"] not in wanted:
                wanted.add(row["id"])
                done.append(row)
        state = "complete, results written again" if before.get("complete") else "continuing"
        print(f"{state}: {len(done)} of {settings['crops']} predictions already in {pred_path} "
              "(same settings)", file=sys.stderr)
    elif any((out_dir / name).exists() for name in (RUN_FILE, PREDICTIONS, *RESULTS)):
        if isinstance(before, dict) and isinstance(before.get("settings"), dict):
            old = before["settings"]
            changed = ", ".join(CHANGED.get(k, f"{k} {old.get(k)!r} -> {v!r}")
                                for k, v in settings.items() if old.get(k) != v)
            why = f"it held a run with other settings ({changed})" if changed else f"{pred_path} is missing"
        else:
            why = "it held an earlier run without run.json"
        print(f"starting over in {out_dir}: {why}", file=sys.stderr)
    for name in RESULTS:
        (out_dir / name).unlink(missing_ok=True)
    write_atomic(pred_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done))
    write_atomic(state_path, json.dumps({"settings": settings, "complete": False}, indent=1) + "\n")
    return done


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then move it into place: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def evaluate(args: EvalArguments) -> dict:

    from paddleocr_vl_manga.data.collator import configure_image_size
    from paddleocr_vl_manga.data.lengths import filter_split
    from paddleocr_vl_manga.model.generation import (
        default_num_workers,
        generation_flag_error,
        pixel_bounds_error,
    )
    from paddleocr_vl_manga.model.loading import load_for_inference

    if args.batch_size <= 0:
        raise EvalError(f"--batch_size must be positive, got {args.batch_size}")
    if args.num_workers is not None and args.num_workers < 0:
        raise EvalError(f"--num_workers must be 0 or more, got {args.num_workers}")
    flags = generation_flag_error(args.max_new_tokens, args.min_pixels, args.max_pixels)
    if flags:
        raise EvalError(flags)
    ds, total, source = select_records(args)
    model, processor, device = load_for_inference(args.model_path, quantize=args.quantize,
                                                  trust_remote_code=args.trust_remote_code,
                                                  full_vocabulary=args.full_vocabulary,
                                                  vision_runtime=args.vision_runtime)
    print(head_line(model), file=sys.stderr)  # restricted by output_vocabulary.json or not
    dtype = "int8 (" + args.quantize + ")" if args.quantize else str(next(model.parameters()).dtype)
    if args.vision_runtime:  # its int8 tower reads other texts than torch's: another run
        dtype += f", vision tower on {args.vision_runtime}"
    if args.num_workers is None:
        args.num_workers = default_num_workers(device)
    configure_image_size(processor, args.min_pixels, args.max_pixels)
    bounds = pixel_bounds_error(processor, args.model_path)
    if bounds:
        raise EvalError(bounds)
    lengths = filter_split(args.split, ds, processor, args.max_length)  # the rule training uses
    if lengths.dropped or lengths.padded:
        print(lengths.line(), file=sys.stderr)
    if not ds.records:
        raise EvalError(f"every crop of {source} is longer than --max_length {args.max_length}")
    sample_books(ds, args)
    records = ds.records
    out_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args.model_path, args.split)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = run_settings(args, records, source, processor, str(dtype), head_size(model))
    done = start_run(out_dir, settings)

    t0 = time.perf_counter()
    rows = predict_records(model, processor, records, source, out_dir / PREDICTIONS, args, done)
    seconds = time.perf_counter() - t0
    generated = len(rows) - len(done)
    size = processor.image_processor.size
    res = {
        "model_path": args.model_path, "data_file": source, "split": args.split, "num_samples": len(rows),
        "split_size": total, "seed": args.seed, "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "max_new_tokens": args.max_new_tokens, "sample_lengths": lengths.summary(),
        "min_pixels": size["shortest_edge"],
        "max_pixels": size["longest_edge"], "device": device_description(device), "dtype": str(dtype),
        "lm_head": settings["lm_head"],
        "seconds": round(seconds, 3), "crops_per_second": round(generated / max(seconds, 1e-9), 3),
        "continued_from": len(done),  # predictions an interrupted run had written (not timed here)
        "metrics": all_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows]),
        "by_book": breakdown(rows, "book"), "by_orientation": breakdown(rows, "orientation"),
        "worst": sorted(rows, key=lambda r: (-r["edits"], r["id"]))[: max(args.worst, 0)],
        "stops": stop_counts(rows), "empty_answers": empty_answers(rows),
        "confidence": confidence_halves(rows),
    }
    write_report(res, rows, out_dir / ".report.html.tmp")
    os.replace(out_dir / ".report.html.tmp", out_dir / "report.html")
    write_atomic(out_dir / "summary.md", summary_markdown(res))
    write_atomic(out_dir / "metrics.json", json.dumps(res, ensure_ascii=False, indent=1) + "\n")
    write_atomic(out_dir / RUN_FILE, json.dumps({"settings": settings, "complete": True}, indent=1) + "\n")
    return {**res, "output_dir": str(out_dir)}


def compare(paths: list[str], output_dir: str | None, limit: int) -> int:
    runs, labels = load_runs(paths)
    # Read before anything is written, so a missing predictions.jsonl leaves no half-written output behind.
    preds = [read_predictions(p) for p in paths] if output_dir and len(runs) == 2 else []
    table = compare_markdown(runs, labels)
    print(table, end="")
    if output_dir:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.md").write_text(table, encoding="utf-8")
        if preds:
            c = write_comparison((labels[0], runs[0], preds[0]), (labels[1], runs[1], preds[1]),
                                 out / "comparison.html", limit=max(limit, 0))
            print(f"{c['fixed']} crops fixed, {c['broken']} broken by the second run "
                  f"-> {out / 'comparison.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    from paddleocr_vl_manga.model.loading import ModelLoadError

    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(args=argv)
    try:
        if args.compare:
            return compare(args.compare, args.output_dir, args.worst)
        if not args.model_path:
            raise EvalError("--model_path is required (or --compare A.json B.json)")
        res = evaluate(args)
    except (EvalError, DatasetError, ModelLoadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    print(summary_markdown(res), end="")
    print(f"-> {res['output_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
