"""OCR text-line crops, or the text boxes of a page, with a PaddleOCR-VL checkpoint.

    python predict.py --model_path ./runs/ft crop1.png crop2.png            # prints path<TAB>text
    python predict.py --model_path ./runs/ft crops/*.png --output preds.jsonl
    python predict.py --model_path ./runs/ft crops/*.png --json              # one JSON object a line
    python predict.py --model_path ./runs/ft page.jpg --boxes boxes.json     # [[x0,y0,x1,y1], ...]
    python predict.py --model_path ./runs/ft Manga109s/images/ARMS/003.jpg \\
        --manga109_xml Manga109s/annotations/ARMS.xml --page 3

With boxes, each output line is path<TAB>x0,y0,x1,y1<TAB>text. Printed text has newlines and tabs escaped
as \\n and \\t; the JSONL (--output, or --json on stdout) keeps it exact and adds each line's confidence (the
geometric mean probability of its tokens, in [0, 1]), min_probability (its least sure token) and stop (eos:
the model finished; cap: its token cap; loop: a repeat was cut). Output is flushed after every chunk of crops.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from PIL import Image


class PredictError(Exception):
    """Bad arguments or input; printed as one `error: ...` line."""


def open_image(path: str) -> Image.Image:
    from paddleocr_vl_manga.data.dataset import (
        open_rgb,  # every mode converted as training and evaluation convert it
    )

    try:
        return open_rgb(path)
    except (OSError, ValueError) as e:
        raise PredictError(f"cannot open image {path} ({e})") from None


def boxes_from_json(path: str, width: int, height: int) -> list[dict]:
    """A JSON list of [x0, y0, x1, y1] or of objects with a "bbox" key; boxes are clipped to the page."""
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PredictError(f"cannot read boxes from {path}: {e}") from None
    if not isinstance(items, list):
        raise PredictError(f"{path}: expected a JSON list of boxes")
    jobs = []
    for i, item in enumerate(items):
        box = item.get("bbox") if isinstance(item, dict) else item
        ok = isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)
        if not ok:
            raise PredictError(f"{path}[{i}]: expected [xmin, ymin, xmax, ymax] or an object with a bbox "
                               f"key, got {item!r}")
        x0, y0, x1, y1 = (round(v) for v in box)
        clipped = [max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)]
        if x0 >= x1 or y0 >= y1 or clipped[0] >= clipped[2] or clipped[1] >= clipped[3]:
            raise PredictError(f"{path}[{i}]: box {box} is empty or outside the {width}x{height} image")
        extra = {"id": item["id"]} if isinstance(item, dict) and "id" in item else {}
        jobs.append({"bbox": clipped, **extra})
    return jobs


def boxes_from_manga109(
    xml_path: str, page: int, width: int, height: int, margin: int, min_size: int
) -> list[dict]:
    """The page's <text> boxes, validated and clipped exactly as prepare_manga109_data.py does."""
    from lxml import etree

    import paddleocr_vl_manga.data.manga109_scan as prep_scan

    try:
        tree = etree.parse(xml_path, etree.XMLParser(resolve_entities=False, no_network=True))
    except (OSError, etree.XMLSyntaxError) as e:
        raise PredictError(f"cannot read {xml_path}: {e}") from None
    page_el = next((p for p in tree.iterfind(".//pages/page") if p.get("index") == str(page)), None)
    if page_el is None:
        raise PredictError(f"{xml_path} has no page with index {page}")
    try:
        size = (prep_scan._int_attr(page_el, "width"), prep_scan._int_attr(page_el, "height"))
    except ValueError as e:
        raise PredictError(f"{xml_path} page {page}: bad attribute {e}") from None
    if size != (width, height):
        raise PredictError(f"the image is {width}x{height} but {xml_path} page {page} is {size[0]}x{size[1]}")
    title = tree.getroot().get("title", Path(xml_path).stem)
    args = prep_scan.PrepareArguments(margin=margin, min_size=min_size)
    skipped: Counter = Counter()
    jobs = []
    for t in page_el.findall("text"):
        box = prep_scan._check_box(t, title, page, width, height, args,
                                   lambda reason: skipped.update([reason]))
        if box:
            jobs.append({"bbox": list(box.bbox), "id": box.text_id, "reference": box.text})
    if skipped:
        print(f"skipped {sum(skipped.values())} text boxes: {dict(skipped)}", file=sys.stderr)
    return jobs


def run(a: argparse.Namespace) -> int:
    from paddleocr_vl_manga.data.collator import configure_image_size
    from paddleocr_vl_manga.model.generation import (
        default_num_workers,
        generation_flag_error,
        pixel_bounds_error,
    )
    from paddleocr_vl_manga.model.loading import load_for_inference
    from paddleocr_vl_manga.model.output_vocabulary import head_line

    flags = generation_flag_error(a.max_new_tokens, a.min_pixels, a.max_pixels)
    if flags:
        raise PredictError(flags)
    folders = [p for p in a.images if Path(p).is_dir()]
    if folders:
        raise PredictError(f"{folders[0]} is a folder: give image files (e.g. {Path(folders[0]) / '*.png'}), "
                           "or one page image with --boxes/--manga109_xml")
    if (a.boxes or a.manga109_xml) and len(a.images) != 1:
        raise PredictError("--boxes/--manga109_xml take exactly one page image")
    if a.boxes and a.manga109_xml:
        raise PredictError("give either --boxes or --manga109_xml, not both")
    if (a.manga109_xml is None) != (a.page is None):
        raise PredictError("--manga109_xml and --page go together")
    page = None
    if a.boxes or a.manga109_xml:
        page = open_image(a.images[0])
        jobs = (boxes_from_json(a.boxes, *page.size) if a.boxes else
                boxes_from_manga109(a.manga109_xml, a.page, *page.size, a.margin, a.min_size))
    else:
        missing = [p for p in a.images if not Path(p).is_file()]
        if missing:  # before loading the model: a typo should not cost a model load
            raise PredictError(f"image not found: {missing[0]} ({len(missing)} of {len(a.images)} missing)")
        jobs = [{} for _ in a.images]
    model, processor, device = load_for_inference(a.model_path, quantize=a.quantize,
                                                  trust_remote_code=a.trust_remote_code,
                                                  full_vocabulary=a.full_vocabulary,
                                                  vision_runtime=a.vision_runtime)
    print(head_line(model), file=sys.stderr)  # restricted by output_vocabulary.json or not
    if a.num_workers is None:
        a.num_workers = default_num_workers(device)
    configure_image_size(processor, a.min_pixels, a.max_pixels)
    bounds = pixel_bounds_error(processor, a.model_path)
    if bounds:
        raise PredictError(bounds)

    # Opened only now, so a bad argument or model never truncates an earlier output file.
    with open(a.output, "w", encoding="utf-8") if a.output else nullcontext(sys.stdout) as out:
        write_predictions(a, model, processor, jobs, page, out)
    return 0


class FileCrops:
    """Crop files as generation input (model.generation.Crops): sizes from their headers, decoded in the
    loader."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def size(self, i: int) -> tuple[int, int]:
        try:
            with Image.open(self.paths[i]) as im:  # reads the header only
                return im.size
        except (OSError, ValueError):  # image() raises the PredictError when its batch is loaded, in order
            return 0, 0

    def image(self, i: int) -> Image.Image:
        return open_image(self.paths[i])


class PageCrops:
    """Boxes of one page as generation input (model.generation.Crops).

    The page is decoded once, in the main process, which needs its size to check the boxes. Loader workers
    fork with it in memory, so each crops from it (a copy of the box's pixels); the resizing and
    normalising of the crops is what they take off the main process. Reopening the page in every worker
    would decode the same JPEG again for nothing."""

    def __init__(self, page: Image.Image, boxes: list[list[int]]) -> None:
        self.page, self.boxes = page, boxes

    def __len__(self) -> int:
        return len(self.boxes)

    def size(self, i: int) -> tuple[int, int]:
        x0, y0, x1, y1 = self.boxes[i]  # clipped to the page: the crop has exactly this size
        return x1 - x0, y1 - y0

    def image(self, i: int) -> Image.Image:
        return self.page.crop(self.boxes[i])


def write_predictions(a: argparse.Namespace, model: Any, processor: Any, jobs: list[dict],
                      page: Image.Image | None, out: Any) -> None:
    from contextlib import closing

    from paddleocr_vl_manga.data.dataset import fitted_size
    from paddleocr_vl_manga.model.generation import crop_chunks, generate_readings, pin_memory

    crops = PageCrops(page, [j["bbox"] for j in jobs]) if page else FileCrops(a.images)
    chunks = crop_chunks(processor, crops, batch_size=a.batch_size, chunk_size=8 * a.batch_size,
                         num_workers=a.num_workers, pin_memory=pin_memory(model, a.num_workers))
    with closing(chunks):
        for chunk in chunks:
            for i in chunk.positions:
                size = crops.size(i)
                # generation pads it into a shape the processor takes ((0, 0): unreadable, reported as such)
                if size != (0, 0) and fitted_size(*size) != size:
                    where = f"box {jobs[i]['bbox']}" if page else a.images[i]
                    print(f"warning: {where}: {size[0]}x{size[1]} padded to {fitted_size(*size)} "
                          "(aspect ratio over what the image processor takes)", file=sys.stderr)
            readings = generate_readings(model, processor, chunk, max_new_tokens=a.max_new_tokens)
            for i, r in zip(chunk.positions, readings, strict=True):
                path = a.images[0] if page else a.images[i]
                if a.output or a.json:
                    record = {"image": path, **jobs[i], "text": r.text, "confidence": round(r.confidence, 6),
                              "min_probability": round(r.min_probability, 6), "stop": r.stop}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                else:
                    box = [",".join(map(str, jobs[i]["bbox"]))] if page else []
                    text = r.text.replace("\n", "\\n").replace("\t", "\\t")
                    out.write("\t".join([path, *box, text]) + "\n")
            out.flush()


def main(argv: list[str] | None = None) -> int:
    from paddleocr_vl_manga.model.quantize import METHODS as QUANTIZE_METHODS
    from paddleocr_vl_manga.model.vision_runtime import RUNTIMES as VISION_RUNTIMES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+", help="crop image files (not folders: crops/*.png), or one page "
                    "image with --boxes/--manga109_xml")
    ap.add_argument("--model_path", required=True, help="hub id or local folder of the model")
    ap.add_argument("--output", help="write JSONL here instead of printing path<TAB>text")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object per input (image, text, confidence, min_probability, stop; "
                    "bbox and id with boxes) instead of path<TAB>text")
    ap.add_argument("--boxes", help="JSON list of [xmin,ymin,xmax,ymax] (or objects with a bbox key) to OCR")
    ap.add_argument("--manga109_xml", help="Manga109 annotation XML: OCR every <text> box of --page")
    ap.add_argument("--page", type=int, help="page index in --manga109_xml")
    ap.add_argument("--margin", type=int, default=0, help="pixels around XML boxes (as in prepare)")
    ap.add_argument("--min_size", type=int, default=10, help="skip XML boxes smaller than this (px)")
    ap.add_argument("--batch_size", type=int, default=16, help="crops per generate() call")
    ap.add_argument("--num_workers", type=int,
                    help="loader processes that decode and preprocess the next crops while the model "
                    "generates (default: 2 on CUDA, one core left to the main process; 0 on CPU, where "
                    "generation already uses every core)")
    ap.add_argument("--max_new_tokens", type=int, default=None,
                    help="token cap of every answer, at least 1 (default: each crop's own, from its size: "
                    "16 + one token per 100 px, at most 256; a looping answer is stopped either way)")
    ap.add_argument("--min_pixels", type=int,
                    help="override the image processor's min_pixels (at most max_pixels)")
    ap.add_argument("--max_pixels", type=int,
                    help="override the image processor's max_pixels (at least min_pixels)")
    ap.add_argument("--quantize", choices=QUANTIZE_METHODS,
                    help="int8 linear layers on the CPU (model/quantize.py: int8 everywhere, int8-text the "
                    "language model only); default: bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--full_vocabulary", action="store_true",
                    help="compute lm_head over the whole vocabulary even where the model folder has an "
                    "output_vocabulary.json (default: only the tokens training's labels used)")
    ap.add_argument("--vision_runtime", choices=VISION_RUNTIMES,
                    help="run the vision tower on this CPU runtime (model/vision_runtime.py; an optional "
                    "package: pip install openvino / onnxruntime), int8 with --quantize int8; default: torch")
    ap.add_argument("--trust_remote_code", action="store_true", help="allow the checkpoint's own code")
    a = ap.parse_args(argv)

    from paddleocr_vl_manga.model.loading import ModelLoadError

    try:
        if a.batch_size <= 0:
            raise PredictError(f"--batch_size must be positive, got {a.batch_size}")
        if a.num_workers is not None and a.num_workers < 0:
            raise PredictError(f"--num_workers must be 0 or more, got {a.num_workers}")
        return run(a)
    except (PredictError, ModelLoadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
