"""`paligemma eval`: a served model scored on a labelled dataset.

    coco_data    COCO annotations -> the detect/segment requests; answers -> COCO results (no pycocotools)
    coco_score   COCO results scored with pycocotools (the `eval` extra), plus per-object localisation
    text         JSONL datasets for caption/VQA/OCR; exact match and character error rate
    report       the numbers as one JSON document, or as text
    cli          the `paligemma eval ...` subcommands (sending uses paligemma_client.runs: bounded
                 concurrency, a progress bar, failures kept)
"""
