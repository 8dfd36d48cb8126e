"""Restricted lm_head against the full one: two evaluate_model.py runs of the same model on the same split.

    python evaluate_model.py --model_path demo_output/sft_output --data_dir demo_output/data \
        --output_dir /tmp/eval_restricted
    python evaluate_model.py --model_path demo_output/sft_output --data_dir demo_output/data \
        --output_dir /tmp/eval_full --full_vocabulary
    python benchmarks/compare_vocab.py /tmp/eval_full /tmp/eval_restricted --model_path demo_output/sft_output

Prints how many crops read identically, each run's CER (metrics "none", as evaluate_model.py reports it), and
the crops whose reference needs a token outside the model's output_vocabulary.json (tokenized as training
labels them, data.collator.answer_ids) with both readings: the restricted head cannot write such a token
and writes the best one inside the set instead. The restriction is exact wherever the full model's greedy
choice lies in the set, so every differing crop is one where the full model wrote an out-of-set token.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paddleocr_vl_manga.data.collator import answer_ids  # noqa: E402
from paddleocr_vl_manga.model.output_vocabulary import OUTPUT_VOCABULARY_FILE  # noqa: E402


def read_run(folder: Path) -> tuple[dict, dict[str, dict]]:
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    lines = (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    return metrics, {r["id"]: r for r in rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("full", type=Path, help="evaluate_model.py output folder of the --full_vocabulary run")
    ap.add_argument("restricted", type=Path, help="evaluate_model.py output folder of the default run")
    ap.add_argument("--model_path", required=True, help="the model folder (its tokenizer and vocabulary)")
    ap.add_argument("--examples", type=int, default=5, help="differing / out-of-set crops to show")
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer

    (full_metrics, full), (restricted_metrics, restricted) = read_run(a.full), read_run(a.restricted)
    if full.keys() != restricted.keys():
        print(f"error: the two runs read different crops ({len(full)} and {len(restricted)})",
              file=sys.stderr)
        return 2
    vocabulary = set(json.loads((Path(a.model_path) / OUTPUT_VOCABULARY_FILE).read_text()))
    tokenizer = AutoTokenizer.from_pretrained(a.model_path)
    ids = list(full)
    needs = answer_ids(tokenizer, [full[i]["reference"] for i in ids])
    outside = [i for i, label in zip(ids, needs, strict=True) if not set(label) <= vocabulary]
    differ = [i for i in ids if full[i]["prediction"] != restricted[i]["prediction"]]
    figures = {
        "crops": len(ids), "vocabulary": len(vocabulary), "identical": len(ids) - len(differ),
        "identical_share": round((len(ids) - len(differ)) / len(ids), 6),
        "cer_full": full_metrics["metrics"]["none"]["cer"],
        "cer_restricted": restricted_metrics["metrics"]["none"]["cer"],
        "lm_head_full": full_metrics.get("lm_head"), "lm_head_restricted": restricted_metrics.get("lm_head"),
        "references_needing_outside_tokens": len(outside),
        "differing_among_those": len(set(differ) & set(outside)),
        "seconds_full": full_metrics["seconds"], "seconds_restricted": restricted_metrics["seconds"],
    }
    print(f"{figures['identical']:,} of {len(ids):,} crops read identically "
          f"({figures['identical_share']:.2%}); CER full {figures['cer_full']:.2%}, restricted "
          f"{figures['cer_restricted']:.2%}; lm_head {figures['lm_head_restricted']} against "
          f"{figures['lm_head_full']}")
    print(f"{len(outside)} references need a token outside the set "
          f"({figures['differing_among_those']} of them read differently); {len(differ)} crops differ")

    def show(i: str) -> str:
        return (f"  {i}: reference {full[i]['reference']!r}, full {full[i]['prediction']!r}, restricted "
                f"{restricted[i]['prediction']!r}")

    for title, chosen in (("differing", differ), ("reference outside the set", outside)):
        if chosen:
            print(f"{title}:", *map(show, chosen[: a.examples]), sep="\n")
    figures["examples"] = [
        {"id": i, "reference": full[i]["reference"], "full": full[i]["prediction"],
         "restricted": restricted[i]["prediction"]} for i in (differ + outside)[: a.examples]
    ]
    if a.json:
        Path(a.json).write_text(json.dumps(figures, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
