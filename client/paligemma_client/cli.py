"""`paligemma`: run a task on one image, or on every image in a folder, against a paligemma-server.

    paligemma caption photo.jpg
    paligemma detect photo.jpg cat dog --draw out.png
    paligemma segment photo.jpg "the dog" --draw out.png
    paligemma detect images/ --objects car --out results.jsonl
    paligemma caption photo.jpg --stream --temperature 0.7 --seed 1
    paligemma detect images/ --objects receipt --adapter receipts --out receipts.jsonl
    paligemma eval detect --coco annotations.json --images images/    (paligemma eval --help)

One image: the result on stdout (`--json` for the whole JSON); with `--stream`, the text as it is
generated first. A folder: one JSON line per image (to
`--out`, or stdout) as answers come, at most `--concurrency` requests in flight, a progress bar on
stderr, a summary at the end; a failing image is reported and the run goes on. Exit status: 0 when every
image succeeded, 1 when any failed, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx
from pydantic import BaseModel

from paligemma_client import __version__
from paligemma_client._core import GenerationOptions
from paligemma_client.client import AsyncPaliGemmaClient, PaliGemmaClient
from paligemma_client.convert import INSTALL_HINT, draw_file
from paligemma_client.errors import PaliGemmaError
from paligemma_client.evaluation import cli as evaluation
from paligemma_client.models import AnswerResponse, Detection, Segment, TaskResponse
from paligemma_client.runs import PROGRESS_MODES, Failure, Progress, error_fields, run_bounded, write_summary

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
LOCATING = ("detect", "segment", "generate")


def build_parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--url", help="the server (default: $PALIGEMMA_URL, else http://localhost:8000)")
    connection.add_argument("--api-key",
                            help="API key, when the server has keys (default: $PALIGEMMA_API_KEY)")
    connection.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one answer")

    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--max-new-tokens", type=int, metavar="N", help="most tokens to generate")
    task.add_argument("--temperature", type=float, metavar="T",
                      help="0 (the server's default): greedy; above 0 (at most 2): sample")
    task.add_argument("--top-p", type=float, metavar="P", help="sample from the likeliest tokens up to P")
    task.add_argument("--top-k", type=int, metavar="K", help="sample from the K likeliest tokens")
    task.add_argument("--seed", type=int, metavar="N", help="the same seed, the same sampled output")
    task.add_argument("--adapter", metavar="NAME",
                      help="a LoRA adapter the server has loaded (/v1/models lists them); default: the base")
    task.add_argument("--stream", action="store_true",
                      help="print the text as it is generated, then the result (one image)")
    task.add_argument("--json", action="store_true", help="print the whole JSON result (one image)")
    task.add_argument("--out", type=Path, metavar="FILE", help="write results as JSON lines to FILE")
    task.add_argument("--concurrency", type=int, default=4, metavar="N",
                      help="requests in flight for a folder (default 4)")
    task.add_argument("--progress", choices=PROGRESS_MODES, default="auto",
                      help="progress bar for a folder on stderr (auto: when stderr is a terminal)")

    parser = argparse.ArgumentParser(prog="paligemma", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    parents = [connection, task]
    image_help = "an image file (JPEG, PNG, WebP), or a folder of them"

    caption = commands.add_parser("caption", parents=parents, help="caption an image")
    caption.add_argument("image", help=image_help)
    caption.add_argument("--language", default="en")
    caption.add_argument("--long", action="store_true", help="a longer description")

    vqa = commands.add_parser("vqa", parents=parents, help="answer a question about an image")
    vqa.add_argument("image", help=image_help)
    vqa.add_argument("question")
    vqa.add_argument("--language", default="en")

    ocr = commands.add_parser("ocr", parents=parents, help="read the text in an image")
    ocr.add_argument("image", help=image_help)

    for name, what in (("detect", "boxes"), ("segment", "boxes and masks")):
        command = commands.add_parser(name, parents=parents, help=f"{what} for objects")
        command.add_argument("image", help=image_help)
        command.add_argument("objects", nargs="*", help="object names or referring expressions")
        command.add_argument("--objects", dest="more_objects", action="append", default=[], metavar="OBJECT",
                             help="one more object (repeatable; handy after a folder)")
        _add_draw(command)

    generate = commands.add_parser("generate", parents=parents, help="run a raw PaliGemma prefix")
    generate.add_argument("image", help=image_help)
    generate.add_argument("prompt", help='the prefix, e.g. "caption es" or "detect car ; person"')
    _add_draw(generate)

    commands.add_parser("models", parents=[connection], help="show the loaded model")
    evaluation.add_parser(commands, connection)
    return parser


def _add_draw(command: argparse.ArgumentParser) -> None:
    command.add_argument("--draw", type=Path, metavar="PATH",
                         help="save the image with the results drawn: a PNG file, or a folder for a "
                              f"folder run (needs supervision: {INSTALL_HINT})")


def task_arguments(args: argparse.Namespace) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments of the client method named `args.task`, after the image."""
    options: dict[str, Any] = {name: getattr(args, name) for name in GenerationOptions.__annotations__}
    if args.task == "caption":
        return (), {**options, "language": args.language, "long": args.long}
    if args.task == "vqa":
        return (args.question,), {**options, "language": args.language}
    if args.task in ("detect", "segment"):
        return ([*args.objects, *args.more_objects],), options
    if args.task == "generate":
        return (args.prompt,), options
    return (), options


def objects_of(result: TaskResponse) -> list[Detection]:
    return [*(getattr(result, "detections", None) or []), *(getattr(result, "segments", None) or [])]


def describe(result: TaskResponse, task: str, with_text: bool = True) -> str:
    """A result as a person reads it: the text (unless it was streamed already), then one line per
    object."""
    lines = []
    text = result.answer if isinstance(result, AnswerResponse) else getattr(result, "text", None)
    if text is not None and with_text:
        lines.append(text)
    objects = objects_of(result)
    for obj in objects:
        b = obj.box
        line = f"{obj.label or '?'}: [{b.x_min:.1f}, {b.y_min:.1f}, {b.x_max:.1f}, {b.y_max:.1f}]"
        if isinstance(obj, Segment):
            line += f", mask {obj.mask_area} px" if obj.mask is not None else f", no mask ({obj.mask_error})"
        lines.append(line)
    if task in ("detect", "segment") and not objects:
        lines.append("no objects found")
    return "\n".join(lines)


def record(path: Path, result: BaseModel | None = None, error: Exception | None = None) -> dict[str, Any]:
    """One JSON line of a folder run."""
    if result is not None:
        return {"file": str(path), "ok": True, "result": result.model_dump(mode="json")}
    assert error is not None
    return {"file": str(path), "ok": False, "error": error_fields(error)}


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


async def run_folder(args: argparse.Namespace, files: list[Path], out: IO[str], err: IO[str],
                     transport: httpx.AsyncBaseTransport | None = None) -> int:
    positional, options = task_arguments(args)
    concurrency = max(1, args.concurrency)
    failures: list[Failure] = []

    async def process(client: AsyncPaliGemmaClient, path: Path) -> bool:
        try:
            result = await getattr(client, args.task)(path, *positional, **options)
            if args.draw is not None:
                await asyncio.to_thread(draw_file, path, result, args.draw / f"{path.stem}.png")
        except (PaliGemmaError, OSError, ValueError) as exc:
            failures.append(Failure(str(path), str(exc)))
            line = record(path, error=exc)
        else:
            line = record(path, result)
        out.write(json.dumps(line) + "\n")
        out.flush()
        return bool(line["ok"])

    started = time.monotonic()
    async with AsyncPaliGemmaClient(args.url, api_key=args.api_key, timeout=args.timeout,
                                    max_connections=concurrency, transport=transport) as client:
        await run_bounded(files, lambda path: process(client, path), concurrency,
                          Progress.shown(len(files), err, args.progress))
    write_summary(err, len(files), "images", failures, time.monotonic() - started)
    return 1 if failures else 0


def stream_one(client: PaliGemmaClient, args: argparse.Namespace, path: Path, out: IO[str]) -> Any:
    """Print the text as it is generated (the raw output, <loc>/<seg> tokens included); return the result."""
    positional, options = task_arguments(args)
    with getattr(client, f"{args.task}_stream")(path, *positional, **options) as stream:
        try:
            for delta in stream:
                out.write(delta)
                out.flush()
        finally:
            out.write("\n")  # end the streamed line, also when the stream fails midway
        return stream.result


def run_one(args: argparse.Namespace, path: Path, out: IO[str], err: IO[str]) -> int:
    positional, options = task_arguments(args)
    with PaliGemmaClient(args.url, api_key=args.api_key, timeout=args.timeout) as client:
        try:
            if args.stream:
                result = stream_one(client, args, path, out)
            else:
                result = getattr(client, args.task)(path, *positional, **options)
        except PaliGemmaError as exc:
            err.write(f"paligemma: {path}: {exc}\n")
            return 1
    if result.warning:
        err.write(f"warning: {result.warning}\n")
    if args.out is not None:
        args.out.write_text(json.dumps(record(path, result)) + "\n")
    if args.json:
        out.write(result.model_dump_json(indent=2) + "\n")
    elif args.out is None:
        described = describe(result, args.task, with_text=not args.stream)
        if described:
            out.write(described + "\n")
    if getattr(args, "draw", None) is not None:
        draw_file(path, result, args.draw)
        count = len(objects_of(result))
        err.write(f"drew {count} object{'' if count == 1 else 's'}: {args.draw}\n")
    return 0


def main(argv: list[str] | None = None, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.task == "models":
        try:
            with PaliGemmaClient(args.url, api_key=args.api_key, timeout=args.timeout) as client:
                out.write(client.models().model_dump_json(indent=2) + "\n")
        except PaliGemmaError as exc:
            err.write(f"paligemma: {exc}\n")
            return 1
        return 0
    if args.task == "eval":
        return evaluation.run(args, out, err)

    if args.task in ("detect", "segment") and not [*args.objects, *args.more_objects]:
        parser.error(f"{args.task} needs at least one object: paligemma {args.task} IMAGE OBJECT... "
                     "(or --objects OBJECT)")
    if getattr(args, "draw", None) is not None and importlib.util.find_spec("supervision") is None:
        parser.error(f"--draw needs the supervision package: {INSTALL_HINT}")
    path = Path(args.image)
    if path.is_dir():
        files = images_in(path)
        if not files:
            parser.error(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if args.stream:
            parser.error("--stream prints one image's text as it is generated; leave it out for a folder")
        if getattr(args, "draw", None) is not None:
            args.draw.mkdir(parents=True, exist_ok=True)
        if args.out is None:
            return asyncio.run(run_folder(args, files, out, err))
        with args.out.open("w") as sink:
            return asyncio.run(run_folder(args, files, sink, err))
    if not path.is_file():
        parser.error(f"{path}: no such file or folder")
    return run_one(args, path, out, err)


if __name__ == "__main__":
    sys.exit(main())
