"""`paligemma eval`: send a labelled dataset to a server and score its answers.

    paligemma eval detect --coco annotations.json --images images/
    paligemma eval segment --coco annotations.json --images images/ --json
    paligemma eval vqa --jsonl vqa.jsonl --save-predictions answers.jsonl

detect/segment score with pycocotools (`pip install 'paligemma-client[eval]'`); caption/vqa/ocr need
nothing more. Exit status: 0 when every request was answered, 1 when any failed (each is listed at the
end; the scores cover the images that were answered), 2 for unusable arguments or files. docs/eval.md
says what every number means.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx

from paligemma_client.client import AsyncPaliGemmaClient
from paligemma_client.errors import PaliGemmaError
from paligemma_client.evaluation import coco_data, coco_score, report, text
from paligemma_client.evaluation.coco_score import INSTALL_HINT, MissingExtra
from paligemma_client.evaluation.text import DatasetError
from paligemma_client.models import AdapterCard, DetectResponse, ModelCard, SegmentResponse, TaskResponse
from paligemma_client.runs import PROGRESS_MODES, Failure, Progress, collect_answers, write_summary

J = TypeVar("J")
R = TypeVar("R", bound=TaskResponse)

DEFAULT_MAX_OBJECTS = 16  # the server's default PALIGEMMA_MAX_OBJECTS


class Unusable(Exception):
    """An argument, a file or the server cannot be used for this evaluation (exit status 2)."""


def add_parser(commands: Any, connection: argparse.ArgumentParser) -> None:
    """`paligemma eval TASK ...` under the command line's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document with every number")
    common.add_argument("--concurrency", type=int, default=4, metavar="N",
                        help="requests in flight (default 4)")
    common.add_argument("--progress", choices=PROGRESS_MODES, default="auto",
                        help="progress bar on stderr (auto: when stderr is a terminal)")
    common.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="most tokens an answer may have (detect/segment: the server's cap, from "
                             "/v1/models; caption/vqa/ocr: the server's default)")
    common.add_argument("--adapter", metavar="NAME",
                        help="score a LoRA adapter the server has loaded (/v1/models lists them); default: "
                             "the base model")
    common.add_argument("--save-predictions", type=Path, metavar="FILE",
                        help="write the answers: COCO results JSON for detect/segment, JSON lines otherwise")
    evaluation = commands.add_parser("eval", help="score the served model on a labelled dataset",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = evaluation.add_subparsers(dest="eval_task", required=True, metavar="TASK")
    parents = [connection, common]
    for task, what in (("detect", "boxes: COCO bbox AP (pycocotools)"),
                       ("segment", "masks: COCO segm AP (pycocotools)")):
        command = tasks.add_parser(task, parents=parents, help=what, description=f"{task}: {what}. "
                                   f"Needs pycocotools: {INSTALL_HINT}.")
        command.add_argument("--coco", type=Path, required=True, metavar="ANNOTATIONS.json",
                             help="COCO annotations (images, annotations, categories)")
        command.add_argument("--images", type=Path, required=True, metavar="DIR",
                             help="the folder the images' file_name is relative to")
        command.add_argument("--all-categories", action="store_true",
                             help="ask every image for every category (default: the categories annotated "
                                  "in it), split into requests of at most --max-objects names")
        command.add_argument("--max-objects", type=int, default=DEFAULT_MAX_OBJECTS, metavar="N",
                             help=f"most names in one request: the server's PALIGEMMA_MAX_OBJECTS "
                                  f"(default {DEFAULT_MAX_OBJECTS})")
        command.set_defaults(eval_parser=command)
    for task in text.TEXT_TASKS:
        cer = task == "ocr"
        command = tasks.add_parser(task, parents=parents,
                                   help=f"{task}: exact match" + (" and character error rate" if cer else ""),
                                   description=f"{task} answers against accepted answers: exact match once "
                                   f"both are {text.NORMALISATION[task]}"
                                   + ("; character error rate (edits / length) against the closest one, "
                                      "where an empty accepted answer counts 0 for an empty reading, else 1"
                                      if cer else "") + ".")
        command.add_argument("--jsonl", type=Path, required=True, metavar="FILE",
                             help='one {"image": path, ' + ('"question": "...", ' if task == "vqa" else "")
                                  + '"answers": ["..."]} a line; paths relative to the file\'s folder')
        if task != "ocr":
            command.add_argument("--language", default="en")
        command.set_defaults(eval_parser=command)


def run(args: argparse.Namespace, out: IO[str], err: IO[str],
        transport: httpx.AsyncBaseTransport | None = None) -> int:
    """Run `paligemma eval ...`; its exit status. Unusable input exits 2 through the subcommand's parser."""
    try:
        if args.eval_task in ("detect", "segment"):
            return _run_locate(args, out, err, transport)
        return _run_text(args, out, err, transport)
    except (Unusable, DatasetError, MissingExtra) as exc:
        args.eval_parser.error(str(exc))
        raise  # not reached: error() exits


def _check_common(args: argparse.Namespace) -> None:
    if args.concurrency < 1:
        raise Unusable(f"--concurrency must be at least 1. Given: {args.concurrency}")
    saved = args.save_predictions
    if saved is not None and not saved.parent.is_dir():
        raise Unusable(f"--save-predictions {saved}: the folder {saved.parent} does not exist")


async def _answer_all(args: argparse.Namespace, jobs: Sequence[J], name: Callable[[J], str],
                      ask: Callable[[AsyncPaliGemmaClient, ModelCard, J], Awaitable[R]],
                      check: Callable[[ModelCard], None], err: IO[str],
                      transport: httpx.AsyncBaseTransport | None
                      ) -> tuple[ModelCard | None, dict[int, R], list[Failure]]:
    """The loaded model (None when /v1/models failed), every job's answer by index, and the failures."""
    started = time.monotonic()
    async with AsyncPaliGemmaClient(args.url, api_key=args.api_key, timeout=args.timeout,
                                    max_connections=args.concurrency, transport=transport) as client:
        try:
            listed = await client.models()
        except PaliGemmaError as exc:
            failure = Failure(f"{client.base_url}/v1/models", str(exc))
            err.write(f"no request sent: {failure.item}: {failure.error}\n")
            return None, {}, [failure]
        card = listed.base
        loaded = [entry.id for entry in listed.data if isinstance(entry, AdapterCard)]
        if args.adapter is not None and args.adapter not in loaded:
            raise Unusable(f"--adapter {args.adapter}: the server has not loaded it; loaded adapters: "
                           f"{', '.join(loaded) or 'none'}")
        check(card)
        if card.warning:
            err.write(f"warning: {card.warning}\n")
        answers, failures = await collect_answers(
            jobs, lambda job: ask(client, card, job), name, args.concurrency,
            Progress.shown(len(jobs), err, args.progress))
    write_summary(err, len(jobs), "requests", failures, time.monotonic() - started)
    return card, answers, failures


def _run_locate(args: argparse.Namespace, out: IO[str], err: IO[str],
                transport: httpx.AsyncBaseTransport | None) -> int:
    masks = args.eval_task == "segment"
    coco_score.require()
    _check_common(args)
    if args.max_objects < 1:
        raise Unusable(f"--max-objects must be at least 1. Given: {args.max_objects}")
    if not args.images.is_dir():
        raise Unusable(f"--images {args.images}: no such folder")
    dataset = coco_data.load_dataset(args.coco, masks)
    requests = coco_data.plan_requests(dataset, args.images, args.all_categories, args.max_objects)

    def check(card: ModelCard) -> None:
        if masks and not card.masks:
            raise Unusable(f"the server at {args.url or 'PALIGEMMA_URL'} decodes no masks (/v1/models: "
                           "masks false); start it with a mask decoder (PALIGEMMA_MASK_DECODER)")

    async def ask(client: AsyncPaliGemmaClient, card: ModelCard, request: coco_data.LocateRequest
                  ) -> DetectResponse | SegmentResponse:
        tokens = args.max_new_tokens or card.max_new_tokens  # a long list of objects needs many tokens
        method = client.segment if masks else client.detect
        response = await method(request.path, list(request.objects), max_new_tokens=tokens,
                                adapter=args.adapter)
        coco_data.check_size(request, response)
        return response

    card, answers, failures = asyncio.run(_answer_all(args, requests, lambda r: r.name, ask, check, err,
                                                      transport))
    results = coco_data.collect(dataset, requests, answers)
    if args.save_predictions is not None:
        args.save_predictions.write_text(json.dumps(results.items) + "\n")
    scored = coco_data.scored_images(requests, answers)
    iou_type = "segm" if masks else "bbox"
    gt = coco_score.ground_truth(dataset, iou_type)
    scores = coco_score.coco_scores(gt, coco_score.loaded_results(gt, results.items), iou_type, scored)
    matches = coco_score.object_matches(gt, results.items, scored, masks)
    document = report.locate_document(args.eval_task, card, args.adapter, dataset, requests, scored, results,
                                      scores, matches, failures)
    out.write(json.dumps(document, indent=2) + "\n" if args.json else report.locate_text(document))
    return 1 if failures else 0


def _run_text(args: argparse.Namespace, out: IO[str], err: IO[str],
              transport: httpx.AsyncBaseTransport | None) -> int:
    task = args.eval_task
    _check_common(args)
    examples = text.load_examples(args.jsonl, task)

    async def ask(client: AsyncPaliGemmaClient, card: ModelCard, example: text.TextExample) -> TaskResponse:
        if task == "caption":
            return await client.caption(example.image, language=args.language,
                                        max_new_tokens=args.max_new_tokens, adapter=args.adapter)
        if task == "vqa":
            return await client.vqa(example.image, example.question or "", language=args.language,
                                    max_new_tokens=args.max_new_tokens, adapter=args.adapter)
        return await client.ocr(example.image, max_new_tokens=args.max_new_tokens, adapter=args.adapter)

    card, answers, failures = asyncio.run(_answer_all(args, examples, lambda e: str(e.image), ask,
                                                      lambda card: None, err, transport))
    scores = [text.score(task, examples[i], report.answer_text(answers[i])) for i in sorted(answers)]
    if args.save_predictions is not None:
        args.save_predictions.write_text("".join(json.dumps(s.record()) + "\n" for s in scores))
    document = report.text_document(task, card, args.adapter, examples, answers, scores, failures)
    out.write(json.dumps(document, indent=2) + "\n" if args.json else report.text_text(document))
    return 1 if failures else 0
