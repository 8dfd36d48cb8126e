"""prepare_manga109_data.py: pixel-exact crops, splits, bad input, idempotent and kill-safe reruns."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import paddleocr_vl_manga.data.manga109 as prep
import paddleocr_vl_manga.data.manga109_scan as prep_scan

REPO = Path(__file__).resolve().parents[2]


def run_prep(root: Path, out: Path, **kw) -> dict:
    kw.setdefault("num_workers", 1)
    kw.setdefault("test_fraction", 0.2)
    kw.setdefault("val_fraction", 0.2)
    return prep.run(prep.PrepareArguments(manga109_root=str(root), output_dir=str(out), **kw))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_records(out: Path) -> dict[str, list[dict]]:
    return {s: read_jsonl(out / f"{s}.jsonl") for s in prep.SPLITS}


def first_text(root: Path, title: str):
    """(xml path, parsed tree, first non-empty <text> element) of a book."""
    from lxml import etree

    path = root / "annotations" / f"{title}.xml"
    tree = etree.parse(str(path))
    el = next(t for t in tree.iterfind(".//text") if (t.text or "").strip())
    return path, tree, el


def titles(root: Path) -> list[str]:
    return sorted((root / "books.txt").read_text(encoding="utf-8").split())


@pytest.fixture(scope="module")
def prepared(synthetic_release: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared")
    return out, run_prep(synthetic_release, out, num_workers=2)


def test_crops_equal_page_regions(synthetic_release: Path, prepared) -> None:
    out, manifest = prepared
    records = [r for rs in all_records(out).values() for r in rs]
    assert len(records) == manifest["crops"] > 20
    pages: dict[tuple[str, int], np.ndarray] = {}
    for r in records:
        key = (r["book"], r["page"])
        if key not in pages:
            pages[key] = np.asarray(
                Image.open(synthetic_release / "images" / r["book"] / f"{r['page']:03d}.jpg")
            )
        x0, y0, x1, y1 = r["bbox"]
        crop = np.asarray(Image.open(out / r["image"]))
        assert crop.shape[:2] == (r["height"], r["width"]) == (y1 - y0, x1 - x0)
        assert np.array_equal(crop, pages[key][y0:y1, x0:x1]), r["id"]
        assert r["orientation"] == ("vertical" if r["height"] > r["width"] else "horizontal")


def test_text_is_exactly_as_annotated(synthetic_release: Path, prepared) -> None:
    from lxml import etree

    out, _ = prepared
    by_id = {r["id"]: r for rs in all_records(out).values() for r in rs}
    for title in titles(synthetic_release):
        tree = etree.parse(str(synthetic_release / "annotations" / f"{title}.xml"))
        for page in tree.iterfind(".//page"):
            for t in page.findall("text"):
                rid = f"{title}/{int(page.get('index')):03d}/{t.get('id')}"
                if rid in by_id:
                    assert by_id[rid]["text"] == t.text


def test_manifest_counts_add_up(prepared) -> None:
    out, m = prepared
    disk = json.loads((out / "manifest.json").read_text())
    splits = all_records(out)
    assert disk["crops"] == sum(len(v) for v in splits.values())
    assert disk["texts_in_annotations"] == disk["crops"] + sum(disk["skipped"]["texts"].values())
    assert {s: v["crops"] for s, v in disk["splits"].items()} == {s: len(v) for s, v in splits.items()}
    per_book = Counter(r["book"] for v in splits.values() for r in v)
    assert disk["crops_per_book"] == dict(per_book)
    assert disk["skipped"]["texts"].get("empty_text", 0) > 0  # the generator's odd cases are there
    assert disk["tool_version"] == prep.TOOL_VERSION


def test_book_split_is_disjoint_and_deterministic(synthetic_release: Path, prepared, tmp_path: Path) -> None:
    out, m = prepared
    books = {s: {r["book"] for r in v} for s, v in all_records(out).items()}
    assert books["train"] and books["val"] and books["test"]
    assert not (
        books["train"] & books["val"] or books["train"] & books["test"] or books["val"] & books["test"]
    )
    # Same seed, different worker count and shuffled books.txt: identical files.
    shuffled = tmp_path / "release"
    import shutil

    shutil.copytree(synthetic_release, shuffled)
    names = titles(shuffled)
    random.Random(1).shuffle(names)
    (shuffled / "books.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    run_prep(shuffled, tmp_path / "again", num_workers=1)
    for s in prep.SPLITS:
        assert (tmp_path / "again" / f"{s}.jsonl").read_bytes() == (out / f"{s}.jsonl").read_bytes()
    other = run_prep(synthetic_release, tmp_path / "seed2", seed=2)
    assert any(other["splits"][s]["books"] != m["splits"][s]["books"] for s in prep.SPLITS)


def test_explicit_book_lists(synthetic_release: Path, tmp_path: Path) -> None:
    names = titles(synthetic_release)
    (tmp_path / "val.txt").write_text(names[0] + "\n")
    (tmp_path / "test.txt").write_text(f"{names[1]}\n{names[2]}\n")
    m = run_prep(
        synthetic_release,
        tmp_path / "o",
        val_books=str(tmp_path / "val.txt"),
        test_books=str(tmp_path / "test.txt"),
    )
    assert m["splits"]["val"]["books"] == [names[0]]
    assert m["splits"]["test"]["books"] == names[1:3]
    assert m["splits"]["train"]["books"] == names[3:]
    (tmp_path / "bad.txt").write_text("NoSuchBook\n")
    with pytest.raises(prep_scan.PrepareError, match="NoSuchBook"):
        run_prep(synthetic_release, tmp_path / "o2", test_books=str(tmp_path / "bad.txt"))


def test_random_mode_reproduces_seed_protocol(synthetic_release: Path, prepared, tmp_path: Path) -> None:
    m = run_prep(
        synthetic_release, tmp_path / "r", split_mode="random", seed=42, test_fraction=0.1, val_fraction=None
    )
    n = m["crops"]
    assert m["splits"]["val"]["crops"] == 0
    assert m["splits"]["test"]["crops"] == int(n * 0.1)
    assert m["splits"]["train"]["crops"] == n - int(n * 0.1)
    ids = {s: [r["id"] for r in v] for s, v in all_records(tmp_path / "r").items()}
    # Per-crop split: the same book appears on both sides (this is the leakage book mode avoids).
    books = {s: {i.split("/")[0] for i in v} for s, v in ids.items()}
    assert books["train"] & books["test"]
    # The seed protocol: shuffle the sorted crop list with seed 42, first 90 % train.
    sorted_ids = [r["id"] for rs in all_records(prepared[0]).values() for r in rs]
    order = sorted(sorted_ids, key=lambda i: (i.split("/")[0], int(i.split("/")[1])))
    assert sorted(ids["train"] + ids["test"]) == sorted(order)


def test_bad_input_is_skipped_and_counted(release_copy: Path, tmp_path: Path) -> None:
    root = release_copy
    names = titles(root)
    # 1. malformed XML
    (root / "annotations" / f"{names[0]}.xml").write_text("<book><pages><page", encoding="utf-8")
    # 2. missing and 3. unreadable page image
    (root / "images" / names[1] / "000.jpg").unlink()
    (root / "images" / names[1] / "001.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    # 4-6. box problems in one book
    path, tree, el = first_text(root, names[2])
    texts = [t for t in tree.iterfind(".//text") if (t.text or "").strip()]
    texts[0].set("xmax", texts[0].get("xmin"))  # xmin >= xmax
    texts[1].set("xmin", "12.5")  # non-integer
    w = int(texts[2].getparent().get("width"))
    texts[2].set("xmin", str(w + 10))
    texts[2].set("xmax", str(w + 50))  # wholly off the page
    tree.write(str(path), encoding="utf-8", xml_declaration=True)
    # 7. title with a path separator or ..
    (root / "books.txt").write_text("\n".join([*names, "../evil", "a/b"]) + "\n", encoding="utf-8")

    m = run_prep(root, tmp_path / "o", test_fraction=0.25, val_fraction=0.25)
    sk = m["skipped"]
    assert sk["books"] == {"malformed_xml": 1, "unsafe_title": 2}
    assert sk["pages"] == {"missing_image": 1, "unreadable_image": 1}
    assert sk["texts"]["invalid_box"] == 1
    assert sk["texts"]["non_integer_coordinate"] == 1
    assert sk["texts"]["off_page"] == 1
    assert sk["texts"]["missing_image"] > 0 and sk["texts"]["unreadable_image"] > 0
    assert m["texts_in_annotations"] == m["crops"] + sum(sk["texts"].values())
    assert names[0] not in m["crops_per_book"]


@pytest.mark.parametrize("case", ["malformed_xml", "invalid_box", "missing_image"])
def test_strict_names_file_page_and_text(release_copy: Path, tmp_path: Path, case: str) -> None:
    root = release_copy
    name = titles(root)[0]
    path, tree, el = first_text(root, name)
    page = el.getparent().get("index")
    if case == "malformed_xml":
        path.write_text("<book><pages>", encoding="utf-8")
        expected = [str(path)]
    elif case == "invalid_box":
        el.set("ymax", el.get("ymin"))
        tree.write(str(path), encoding="utf-8", xml_declaration=True)
        expected = [str(path), f"page {page}", f"text {el.get('id')}"]
    else:
        (root / "images" / name / f"{int(page):03d}.jpg").unlink()
        expected = [f"{int(page):03d}.jpg", f"page {page}"]
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "prepare_manga109_data.py"),
            "--manga109_root",
            str(root),
            "--output_dir",
            str(tmp_path / "o"),
            "--strict",
            "--num_workers",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    for piece in expected:
        assert piece in proc.stderr, proc.stderr


def test_missing_or_wrong_root_stops_at_once(tmp_path: Path) -> None:
    with pytest.raises(prep_scan.PrepareError, match="not found"):
        run_prep(tmp_path / "nope", tmp_path / "o")
    (tmp_path / "not_a_release").mkdir()
    with pytest.raises(prep_scan.PrepareError, match="books.txt"):
        run_prep(tmp_path / "not_a_release", tmp_path / "o")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "prepare_manga109_data.py"),
            "--manga109_root",
            str(tmp_path / "not_a_release"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "not a Manga109 release" in proc.stderr


def test_output_inside_dataset_is_refused(release_copy: Path) -> None:
    with pytest.raises(prep_scan.PrepareError, match="inside the dataset"):
        run_prep(release_copy, release_copy / "out")


def test_rerun_reuses_crops_and_settings_change_needs_overwrite(
    synthetic_release: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    run_prep(synthetic_release, out)
    crop = next((out / "crops").rglob("*.png"))
    before = crop.stat().st_mtime_ns
    first = all_records(out)
    run_prep(synthetic_release, out)
    assert crop.stat().st_mtime_ns == before  # reused, not rewritten
    assert all_records(out) == first
    with pytest.raises(prep_scan.PrepareError, match="--overwrite"):
        run_prep(synthetic_release, out, margin=4)
    m = run_prep(synthetic_release, out, margin=4, overwrite=True)
    rec = read_jsonl(out / "train.jsonl")[0]
    assert Image.open(out / rec["image"]).size == (rec["width"], rec["height"])
    assert m["arguments"]["margin"] == 4


def test_rerun_after_kill_matches_clean_run(synthetic_release: Path, prepared, tmp_path: Path) -> None:
    clean_out, _ = prepared
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        str(REPO / "prepare_manga109_data.py"),
        "--manga109_root",
        str(synthetic_release),
        "--output_dir",
        str(out),
        "--test_fraction",
        "0.2",
        "--val_fraction",
        "0.2",
        "--num_workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("crops/*/*.png"))) < 5:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "run finished before it could be killed"
    # A half-written temp crop, as a kill can leave behind.
    book_dir = next(p for p in (out / "crops").iterdir() if p.is_dir())
    (book_dir / "999_x.png.tmp123").write_bytes(b"\x89PNG half")
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    for name in (f"{s}.jsonl" for s in prep.SPLITS):
        assert (out / name).read_bytes() == (clean_out / name).read_bytes()
    clean_m = json.loads((clean_out / "manifest.json").read_text())
    m = json.loads((out / "manifest.json").read_text())
    clean_m["arguments"].pop("output_dir"), m["arguments"].pop("output_dir")
    assert m == clean_m
    assert not list(out.rglob("*.tmp*"))


def test_rerun_says_crops_were_reused_not_a_speed(synthetic_release: Path, tmp_path: Path, capsys) -> None:
    # A rerun that reused every crop once printed "10,841 crops/s" and "1 books".
    cmd = ["--manga109_root", str(synthetic_release), "--output_dir", str(tmp_path / "o"),
           "--num_workers", "1", "--test_fraction", "0.2", "--val_fraction", "0.2"]
    assert prep.main(cmd) == 0
    first = capsys.readouterr().out
    assert prep.main(cmd) == 0
    again = capsys.readouterr().out
    assert "all cut in this run" in first and "crops/s" in first
    assert "all reused from an earlier run" in again and "crops/s" not in again
    assert "1 books" not in first + again and "1 book\n" in first  # val and test hold one book each


def reencode(path: Path, declared: str, codec: str) -> None:
    """Save an annotation file again in `codec` under the declaration `declared` (characters the codec lacks
    as character references, as an editor exporting to Shift-JIS writes them)."""
    from lxml import etree

    text = etree.tostring(etree.parse(str(path)), encoding="unicode")
    head = f'<?xml version="1.0" encoding="{declared}"?>\n'
    path.write_bytes((head + text).encode(codec, errors="xmlcharrefreplace"))


def test_shift_jis_annotations_are_read_by_their_declaration(release_copy: Path, tmp_path: Path,
                                                             capsys) -> None:
    root = release_copy
    names = titles(root)
    clean = run_prep(root, tmp_path / "clean")
    reencode(root / "annotations" / f"{names[0]}.xml", "Shift_JIS", "shift_jis")
    reencode(root / "annotations" / f"{names[1]}.xml", "Windows-31J", "cp932")  # libxml2 lacks this name
    reencode(root / "annotations" / f"{names[2]}.xml", "utf-8", "shift_jis")  # the declaration lies
    assert prep.main(["--manga109_root", str(root), "--output_dir", str(tmp_path / "o"), "--num_workers", "1",
                      "--test_fraction", "0.25", "--val_fraction", "0.25"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    m = json.loads((tmp_path / "o" / "manifest.json").read_text(encoding="utf-8"))
    assert m["skipped"]["books"] == {"undecodable_xml": 1}  # skipped and counted, never guessed
    assert names[2] not in m["crops_per_book"]

    def texts(out: Path, book: str) -> dict[str, str]:
        return {r["id"]: r["text"] for rs in all_records(out).values() for r in rs if r["book"] == book}

    for book in names[:2]:
        assert texts(tmp_path / "o", book) == texts(tmp_path / "clean", book) != {}
    assert clean["crops_per_book"][names[0]] == m["crops_per_book"][names[0]]


def _no_room_run(root: Path, out: Path, limit: int) -> subprocess.CompletedProcess:
    """prepare in a process whose files may not grow past `limit` bytes (`ulimit -f`; SIGXFSZ ignored, so
    the write fails with EFBIG as on a full disk instead of killing the process)."""
    import resource

    def limit_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, str(REPO / "prepare_manga109_data.py"), "--manga109_root", str(root),
           "--output_dir", str(out), "--test_fraction", "0.2", "--val_fraction", "0.2", "--num_workers", "2"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent, env=env, preexec_fn=limit_size,
                          timeout=300)


@pytest.mark.parametrize("stage", ["crop", "jsonl"])
def test_full_disk_is_one_line_without_debris_and_rerun_recovers(synthetic_release: Path, prepared,
                                                                  tmp_path: Path, stage: str) -> None:
    clean_out, _ = prepared
    biggest_crop = max(p.stat().st_size for p in (clean_out / "crops").rglob("*.png"))
    train_size = (clean_out / "train.jsonl").stat().st_size
    assert biggest_crop < train_size  # so a limit between them stops the JSONL, after every crop
    limit = 1000 if stage == "crop" else (biggest_crop + train_size) // 2
    out = tmp_path / "o"
    proc = _no_room_run(synthetic_release, out, limit)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()  # one line
    assert line.startswith("error: could not write ") and "file-size limit" in line
    assert (".png" if stage == "crop" else "train.jsonl") in line
    assert not list(out.rglob("*.tmp*"))  # no debris
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run([sys.executable, str(REPO / "prepare_manga109_data.py"), "--manga109_root",
                            str(synthetic_release), "--output_dir", str(out), "--test_fraction", "0.2",
                            "--val_fraction", "0.2", "--num_workers", "1"], capture_output=True, cwd=tmp_path)
    assert rerun.returncode == 0
    for name in (f"{s}.jsonl" for s in prep.SPLITS):
        assert (out / name).read_bytes() == (clean_out / name).read_bytes()


def test_shift_jis_from_windows_keeps_its_extensions(release_copy: Path, tmp_path: Path) -> None:
    """Windows editors save "Shift_JIS" as cp932, whose extensions (髙 in names, ①, ㈱) strict Shift_JIS
    lacks: such a book was skipped as "byte N is not Shift_JIS (saved in another encoding, e.g. Shift-JIS?)".
    """
    book = titles(release_copy)[0]
    path, tree, el = first_text(release_copy, book)
    el.text = "髙橋さん①"
    tree.write(str(path), encoding="utf-8", xml_declaration=True)
    clean = run_prep(release_copy, tmp_path / "clean")
    reencode(path, "Shift_JIS", "cp932")
    m = run_prep(release_copy, tmp_path / "o")
    assert m["skipped"]["books"] == {} and m["crops_per_book"][book] == clean["crops_per_book"][book]
    assert all_records(tmp_path / "o") == all_records(tmp_path / "clean")
