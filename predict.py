"""OCR text-line crops, or the text boxes of a page, with a PaddleOCR-VL checkpoint.

    python predict.py --model_path ./runs/ft crop1.png crop2.png            # prints path<TAB>text
    python predict.py --model_path ./runs/ft crops/*.png --output preds.jsonl
    python predict.py --model_path ./runs/ft page.jpg --boxes boxes.json     # [[x0,y0,x1,y1], ...]
    python predict.py --model_path ./runs/ft Manga109s/images/ARMS/003.jpg \\
        --manga109_xml Manga109s/annotations/ARMS.xml --page 3

What it does and why, and every flag: `python predict.py --help` (the module's docstring).
The code: paddleocr_vl_manga.infer.predict (this file is a command: nothing imports it)."""

import sys

from paddleocr_vl_manga.infer.predict import main

if __name__ == "__main__":
    sys.exit(main())
