"""An evaluation's numbers as one JSON document (`--json`), and the same as text for a person."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from paligemma_client.evaluation import text
from paligemma_client.evaluation.coco_data import CocoDataset, LocateRequest, Results
from paligemma_client.evaluation.coco_score import SUMMARY, CocoScores, ObjectMatch, localisation
from paligemma_client.models import AnswerResponse, ModelCard, TaskResponse
from paligemma_client.runs import Failure

NOTE = "every score 1.0: AP from one operating point, see docs/eval.md"


def answer_text(response: TaskResponse) -> str:
    return response.answer if isinstance(response, AnswerResponse) else str(getattr(response, "text", ""))


def _model(card: ModelCard | None, adapter: str | None) -> dict[str, Any]:
    return {"model": card.id if card else None, "adapter": adapter, "warning": card.warning if card else None}


def _failures(failures: Sequence[Failure]) -> list[dict[str, str]]:
    return [{"image": f.item, "error": f.error} for f in sorted(failures, key=lambda f: (f.item, f.error))]


def locate_document(task: str, card: ModelCard | None, adapter: str | None, dataset: CocoDataset,
                    requests: Sequence[LocateRequest], scored: Sequence[int], results: Results,
                    scores: CocoScores, matches: Sequence[ObjectMatch], failures: Sequence[Failure]
                    ) -> dict[str, Any]:
    masks = task == "segment"
    per_category = {}
    for category_id, name in sorted(dataset.categories.items()):
        mine = [m for m in matches if m.category_id == category_id]
        per_category[name] = {**scores.per_category[category_id], **localisation(mine, masks)}
    document: dict[str, Any] = {"task": task, "iou_type": "segm" if masks else "bbox",
                                **_model(card, adapter), **scores.summary, **localisation(matches, masks),
                                "per_category": per_category,
                                "images": len(dataset.images), "images_scored": len(scored),
                                "requests": len(requests), "failed": len(failures),
                                "failed_image_ids": sorted({r.image.id for r in requests} - set(scored)),
                                "predictions": len(results.items),
                                "unmatched_labels": dict(results.unmatched.most_common())}
    if masks:
        document["without_mask"] = results.without_mask
    document.update(dropped=results.dropped, truncated=results.truncated, failures=_failures(failures))
    return document


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _header(document: dict[str, Any]) -> list[str]:
    lines = [f"model: {document['model'] or '(unknown: /v1/models failed)'}"
             + (f", adapter {document['adapter']}" if document.get("adapter") else "")]
    if document["warning"]:
        lines.append(f"warning: {document['warning']}")
    return lines


def locate_text(document: dict[str, Any]) -> str:
    masks = document["task"] == "segment"
    lines = _header(document)
    lines.append(f"{document['images']} images, {document['images_scored']} scored; {document['requests']} "
                 f"requests, {document['failed']} failed; {document['predictions']} predictions")
    lines.append(f"{document['iou_type']}, pycocotools COCOeval ({NOTE})")
    lines.append("  " + "  ".join(f"{name} {_number(document[name])}" for name in SUMMARY))
    local = ["recall_50", "mean_best_iou", *(["mean_mask_iou"] if masks else [])]
    lines.append("  " + "  ".join(f"{name} {_number(document[name])}" for name in local)
                 + f"  ({document['objects']} objects)")
    width = max([len("category"), *(len(name) for name in document["per_category"])])
    columns = ["AP", "AP50", "objects", *local]
    lines.append(f"  {'category':<{width}}  " + "  ".join(f"{c:>13}" for c in columns))
    for name, numbers in document["per_category"].items():
        cells = [str(numbers[c]) if c == "objects" else _number(numbers[c]) for c in columns]
        lines.append(f"  {name:<{width}}  " + "  ".join(f"{cell:>13}" for cell in cells))
    unmatched = document["unmatched_labels"]
    if unmatched:
        shown = ", ".join(f"{label!r} x{count}" for label, count in list(unmatched.items())[:10])
        more = f" and {len(unmatched) - 10} more" if len(unmatched) > 10 else ""
        lines.append(f"labels that name no category ({sum(unmatched.values())}, not scored): {shown}{more}")
    if document.get("without_mask"):
        lines.append(f"{document['without_mask']} segments without a mask (not scored)")
    if document["dropped"]:
        lines.append(f"{document['dropped']} malformed objects dropped by the server")
    lines += _truncated(document)
    return "\n".join(lines) + "\n"


def _truncated(document: dict[str, Any]) -> list[str]:
    count = document["truncated"]
    return [f"{count} answers cut off at max_new_tokens (raise --max-new-tokens)"] if count else []


def text_document(task: str, card: ModelCard | None, adapter: str | None,
                  examples: Sequence[text.TextExample], answers: dict[int, TaskResponse],
                  scores: Sequence[text.TextScore], failures: Sequence[Failure]) -> dict[str, Any]:
    return {"task": task, **_model(card, adapter), **text.summary(task, scores),
            "normalisation": f"answers and accepted answers {text.NORMALISATION[task]}",
            "images": len(examples), "requests": len(examples), "answered": len(answers),
            "failed": len(failures),
            "truncated": sum(response.finish_reason == "length" for response in answers.values()),
            "failures": _failures(failures)}


def text_text(document: dict[str, Any]) -> str:
    lines = _header(document)
    lines.append(f"{document['images']} examples: {document['answered']} answered, "
                 f"{document['failed']} failed")
    lines.append(f"exact_match {_number(document['exact_match'])}  ({document['normalisation']})")
    if "cer" in document:
        lines.append(f"cer {_number(document['cer'])}  (character error rate against the closest answer)")
    lines += _truncated(document)
    return "\n".join(lines) + "\n"
