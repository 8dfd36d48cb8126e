"""synthesize_lines.py: record format, labels that are drawn, no val/test text, determinism, resume."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from fontTools.ttLib import TTFont
from PIL import ImageFont

import paddleocr_vl_manga.data.synth.render as synth_render
import paddleocr_vl_manga.data.synth.run as S
import paddleocr_vl_manga.data.synth.text as synth_text
from paddleocr_vl_manga.data.dataset import OCRDataset
from paddleocr_vl_manga.data.synth.fonts import find_cjk_fonts

# The core generator runs on the fonts `make setup` installs (IPA gothic/mincho), whatever else is here.
FONTS = find_cjk_fonts()
pytestmark = pytest.mark.skipif(not FONTS, reason="no CJK font: run tools/fonts.py --ensure")
VAL_MARK, TEST_MARK = "検証専用の台詞です", "試験専用の台詞です"


@pytest.fixture(autouse=True, scope="module")
def ipa_fonts_and_small_chunks():
    mp_ = pytest.MonkeyPatch()
    mp_.setenv("MANGA_OCR_FONTS", os.pathsep.join(FONTS[:4]))
    mp_.setattr(S, "CHUNK", 40)  # many chunks in few lines: resume and shards get something to do
    yield
    mp_.undo()


@pytest.fixture(scope="module")
def manga109(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepared fixture with val/test texts no train text contains: they must never be drawn."""
    out = tmp_path_factory.mktemp("m109_marked")
    shutil.copytree(prepared, out, dirs_exist_ok=True)
    for split, mark in (("val", VAL_MARK), ("test", TEST_MARK)):
        recs = [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
        assert recs
        (out / f"{split}.jsonl").write_text(
            "".join(json.dumps({**r, "text": mark}, ensure_ascii=False) + "\n" for r in recs))
    return out


def _args(out: Path, **kw) -> S.SynthArguments:
    return S.SynthArguments(out=str(out), **{"num_lines": 200, "seed": 3, "num_workers": 1, **kw})


def _digest(out: Path) -> dict[str, str]:
    files = [out / "train.jsonl", *sorted((out / "crops").rglob("*.png"))]
    return {str(p.relative_to(out)): hashlib.sha1(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def synth(manga109: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    summary = S.run(_args(out, manga109_dir=str(manga109), preview=True))
    assert summary["complete"] and summary["lines"] == 200
    return out


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]


def test_prepare_record_format_and_dataset(synth: Path, prepared: Path):
    real = json.loads((prepared / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    recs = records(synth)
    assert len(recs) == 200 and len({r["id"] for r in recs}) == 200
    for r in recs:
        assert set(real) <= set(r) and {"font", "render", "source"} <= set(r)
        assert os.path.isfile(r["font"]) and r["text"] and not any(c.isspace() for c in r["text"])
    ds = OCRDataset(synth / "train.jsonl")
    assert [ds[i]["image"].size for i in range(5)] == [(r["width"], r["height"]) for r in recs[:5]]
    manifest = json.loads((synth / "manifest.json").read_text())
    assert manifest["crops"] == 200 and manifest["splits"]["train"]["crops"] == 200
    assert (synth / "preview.png").stat().st_size > 1000
    stats = manifest["stats"]
    # Every look the issue asks for actually happens on a 200-line run.
    assert 0.4 < stats["vertical"] < 0.95 and set(stats["sources"]) == {"manga109", "recombined", "mixture"}
    for key in ("bubble", "stroke", "furigana", "page_background", "augmented"):
        assert stats[key] > 0.05, key


def test_val_and_test_texts_never_drawn(synth: Path, manga109: Path):
    texts = [r["text"] for r in records(synth)]
    train = {json.loads(line)["text"] for line in (manga109 / "train.jsonl").read_text().splitlines()}
    assert sum(t in train for t in texts) > 50  # train texts are used, so the check below means something
    assert not any(VAL_MARK[:4] in t or TEST_MARK[:4] in t for t in texts)
    assert all(r["render"]["background"].split(":")[1].split("/")[0] in
               {json.loads(line)["book"] for line in (manga109 / "train.jsonl").read_text().splitlines()}
               for r in records(synth) if r["render"]["background"].startswith("page:"))


def test_labels_hold_only_characters_their_font_draws(synth: Path):
    cmaps, fonts = {}, {}
    for r in records(synth):
        path = r["font"]
        if path not in cmaps:
            cmaps[path] = TTFont(path, lazy=True).getBestCmap()
            fonts[path] = ImageFont.truetype(path, 32)
        for ch in r["text"]:
            assert ord(ch) in cmaps[path] and synth_render._ink(fonts[path], ch) is not None, (r["id"], ch)


def test_blank_glyphs_are_not_supported():
    # Spaces are in every cmap but have no outline: a check that trusted the cmap would keep them.
    info = synth_render.font_info(FONTS[0], "gothic", "あ漢 \u3000ー")
    assert info["chars"] == "あ漢ー" and info["vertical"] is False  # no 「」、。 among the candidates


def test_vertical_check_rejects_a_font_without_vertical_forms():
    dejavu = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    if not os.path.isfile(dejavu):
        pytest.skip("DejaVu Sans not installed")
    # drawn horizontally in a column
    assert "…" in synth_render.font_info(dejavu, "latin", "…―")["no_vertical"]
    ipa = synth_render.font_info(FONTS[0], "gothic", "ー「」、。…")
    assert ipa["vertical"] and not ipa["no_vertical"]


def test_layout_direction(synth: Path):
    single = [r for r in records(synth) if len(r["text"]) >= 4 and not r["render"]["multi_line"]
              and "rotate" not in r["render"] and "perspective" not in r["render"]]
    vert = [r for r in single if r["render"]["vertical"]]
    horiz = [r for r in single if not r["render"]["vertical"]]
    assert vert and horiz
    assert all(r["height"] > r["width"] for r in vert)
    assert all(r["width"] > r["height"] for r in horiz)


def test_same_files_at_any_worker_count_and_shards(synth: Path, manga109: Path, tmp_path: Path):
    S.run(_args(tmp_path / "w2", manga109_dir=str(manga109), num_workers=2))
    assert _digest(tmp_path / "w2") == _digest(synth)
    first = S.run(_args(tmp_path / "sh", manga109_dir=str(manga109), shard="1/2"))
    assert not first["complete"] and not (tmp_path / "sh" / "train.jsonl").exists()
    parts = sorted(p.name for p in (tmp_path / "sh" / "parts").iterdir())
    assert parts == ["00000.jsonl", "00002.jsonl", "00004.jsonl"]  # chunks 0, 2, 4 of 5
    assert S.run(_args(tmp_path / "sh", manga109_dir=str(manga109), shard="2/2"))["complete"]
    assert _digest(tmp_path / "sh") == _digest(synth)


def test_kill_9_then_rerun_gives_the_same_files(synth: Path, manga109: Path, tmp_path: Path):
    out = tmp_path / "killed"
    args = _args(out, manga109_dir=str(manga109))
    child = mp.get_context("fork").Process(target=S.run, args=(args,))
    child.start()
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / "parts").glob("*.jsonl"))) < 2:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert 2 <= len(list((out / "parts").glob("*.jsonl"))) < 5 and not (out / "train.jsonl").exists()
    S.run(args)
    assert _digest(out) == _digest(synth)
    assert not list(out.rglob("*.tmp*"))


def test_other_settings_in_the_same_folder_are_refused(synth: Path, tmp_path: Path):
    out = tmp_path / "o"
    S.run(_args(out, num_lines=40))
    with pytest.raises(synth_text.SynthError, match="other settings"):
        S.run(_args(out, num_lines=40, seed=4))
    assert S.run(_args(out, num_lines=40, seed=4, overwrite=True))["complete"]


def test_cli_errors_cleanly(error_line, tmp_path: Path):
    assert "--shard" in error_line(S.main(["--out", str(tmp_path), "--shard", "3/2"]))
    assert "train.jsonl" in error_line(S.main(["--out", str(tmp_path), "--manga109_dir", str(tmp_path)]))


def test_tate_chu_yoko_only_for_short_half_width_runs():
    import random

    units = synth_render._units("12ABこれ12は3!?", random.Random(0), tcy=True)
    assert units == ["1", "2", "A", "B", "こ", "れ", "12", "は", "3!?"]
    assert "".join(units) == "12ABこれ12は3!?"  # the label is what the cells hold, in order
    assert synth_render._units("12は", random.Random(0), tcy=False) == ["1", "2", "は"]


def test_font_styles_and_the_pack(monkeypatch: pytest.MonkeyPatch):
    from paddleocr_vl_manga.data.synth.fonts import find_manga_fonts, font_style

    files = ("ume-tmo3.ttf", "ume-tgo4.ttf", "HachiMaruPop_400Regular.ttf", "kouzan-mouhitsu.ttf",
             "KleeOne_400Regular.ttf", "MTLmr3m.ttf")
    styles = ["mincho", "gothic", "pop", "brush", "handwriting", "rounded"]
    assert [font_style(f"/usr/share/fonts/{f}") for f in files] == styles
    monkeypatch.delenv("MANGA_OCR_FONTS")
    found = find_manga_fonts()
    if len(found) < 20:
        pytest.skip("font pack not installed (python tools/fonts.py --pack manga)")
    assert len({style for _, style in found}) >= 5


def test_mixture_matches_the_character_classes_of_the_train_texts(manga109: Path) -> None:
    """The offline part of a --manga109_dir run draws each character class in train's shares."""
    import random

    texts, lengths, vshare, _ = synth_text.read_manga109(manga109)
    words = synth_text.load_words()
    target = synth_text.class_shares(texts)

    def distance(source: synth_text.TextSource) -> float:
        rng = random.Random(5)
        drawn = synth_text.class_shares(source.mixture(rng, source.length(rng)) for _ in range(3000))
        return sum(abs(drawn[c] - target[c]) for c in synth_text.CLASSES)

    matched = synth_text.TextSource(words, texts, lengths, vshare)
    default = synth_text.TextSource(words, [], lengths, vshare)
    assert distance(matched) < 0.15 and distance(matched) < distance(default) / 2
