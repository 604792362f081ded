"""Edit by example over HTTP (`POST /v1/images/edits`) through an ImageEditor the CLI injects
(LoRA of Change, change.serving.ChangeEditor): serve/ knows only its Protocol (injected.py)."""

from __future__ import annotations

import asyncio
import base64
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from lorafleet.errors import LorafleetError
from lorafleet.serve.api.auth import Principal
from lorafleet.serve.api.errors import APIError, model_not_found
from lorafleet.serve.api.injected import ImageEditor
from lorafleet.serve.api.state import principal, state_of

router = APIRouter()
MAX_IMAGE_MB = 8  # per uploaded image; sides are limited by the editor (info()["max_side"])
FILES = ("image", "before", "after")
TEXTS = ("lora", "model", "response_format", "prompt", "n")
FORMATS = ("png", "b64_json")


def editor_of(request: Request, model: str | None = None, who=None) -> ImageEditor:
    """The editor a request names by `model`: a LoC model of the adapters directory (a 400
    naming the problem when it failed its check), else the one of `--change` (without it, the
    directory's first by name); a 404 when the server has none."""
    state = state_of(request)
    editors = state.image_editors
    if model and editors is not None and who is not None:
        state.check_entry(model, who, text=False)
        found = editors.get(model)
        if found is not None:
            return found
    editor = state.image_editor
    if editor is None and editors is not None and editors.names():
        editor = editors.get(editors.names()[0])
    if editor is None:
        raise APIError(
            404,
            "image edits are off on this server: start it with "
            "`lorafleet serve --change DIR` (a `lorafleet change train` directory)",
            code="no_image_editor",
        )
    return editor


def bad(message: str, param: str | None = None, code: str = "invalid_image") -> APIError:
    return APIError(400, message, code=code, param=param)


async def read_form(request: Request) -> dict:
    """The multipart fields: files as bytes, text fields as str; 400 for anything else."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise bad(
            "send multipart/form-data with files image, before and after (PNG)",
            code="invalid_request",
        )
    limit = int(MAX_IMAGE_MB * 2**20)
    if int(request.headers.get("content-length") or 0) > len(FILES) * limit + 2**20:
        raise bad(f"the request is too large: images are limited to {MAX_IMAGE_MB} MB each")
    try:
        form = await request.form(max_files=len(FILES), max_fields=len(TEXTS))
    except Exception as exc:
        raise bad(f"bad multipart body: {exc}", code="invalid_request") from None
    fields: dict = {}
    for key, value in form.multi_items():
        if key in fields or key not in FILES + TEXTS:
            what = "repeated" if key in fields else "unknown"
            raise bad(
                f"{what} field {key!r}: send {', '.join(FILES + TEXTS)}", key, "invalid_request"
            )
        is_file = hasattr(value, "read")
        if (key in FILES) != is_file:
            need = "a file (e.g. curl -F image=@b.png)" if key in FILES else "a text field"
            raise bad(f"{key}: must be {need}", key, "invalid_request")
        if is_file:
            value = await value.read(limit + 1)
            if len(value) > limit:
                raise bad(f"{key}: the image is over {MAX_IMAGE_MB} MB", key)
        fields[key] = value
    return fields


def check_fields(editor: ImageEditor, fields: dict) -> str:
    """The response format; 400 / 404 for a missing image, a bad n, another model's name."""
    if "image" not in fields:
        raise bad("image: missing (the PNG to edit)", "image", "invalid_request")
    model = fields.get("model")
    if model not in (None, "", editor.name):
        raise model_not_found(model)
    if fields.get("n", "1") != "1":
        raise bad("n: only n=1 is supported", "n", "invalid_request")
    lora = fields.get("lora")
    if lora is not None and lora not in editor.info()["loras"]:
        raise APIError(404, f"no saved LoRA named {lora!r}", code="lora_not_found", param="lora")
    fmt = fields.get("response_format") or "png"
    if fmt not in FORMATS:
        raise bad(
            f"response_format: one of {', '.join(FORMATS)}", "response_format", "invalid_request"
        )
    return fmt


def _png_field(what: str) -> dict:
    return {"type": "string", "format": "binary", "description": what}


# The multipart fields in /openapi.json (the route reads the form itself, to answer every
# problem in OpenAI's shape).
FORM_SCHEMA = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": _png_field("B: the PNG to edit"),
        "before": _png_field("A: the example pair's PNG before the edit"),
        "after": _png_field("A': the example pair's PNG after the edit"),
        "lora": {"type": "string", "description": "a saved LoRA's name, instead of the pair"},
        "model": {"type": "string"},
        "response_format": {"type": "string", "enum": list(FORMATS)},
    },
}
OPENAPI = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": FORM_SCHEMA}}}
}


@router.post("/v1/images/edits", response_model=None, openapi_extra=OPENAPI)
async def image_edits(request: Request, who: Principal = Depends(principal)) -> Response:
    """Multipart files `image` (B), `before` (A), `after` (A') as PNG; or `image` and `lora` (a
    saved LoRA's name) instead of the pair. Optional `model` (the LoC model's id) and
    `response_format`: `png` (default, an image/png body) or `b64_json` (OpenAI's
    `{"created", "data": [{"b64_json"}]}`). The edited image keeps B's size."""
    editor_of(request)  # a 404 first when the server edits no images
    fields = await read_form(request)
    # Off the event loop: naming a LoC model re-checks it if its files changed (a load).
    editor = await asyncio.to_thread(editor_of, request, fields.get("model"), who)
    fmt = check_fields(editor, fields)
    args = (fields["image"], fields.get("before"), fields.get("after"), fields.get("lora"))
    try:
        png = await asyncio.to_thread(editor.edit, *args)  # never on the event loop
    except LorafleetError as exc:
        message = str(exc)
        param = message.split(":", 1)[0] if ":" in message else None
        raise bad(message, param if param in FILES + TEXTS else None) from None
    headers = {"X-Lorafleet-Model": editor.name}
    if fmt == "png":
        return Response(png, media_type="image/png", headers=headers)
    body = {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(png).decode()}]}
    return JSONResponse(body, headers=headers)


@router.get("/v1/images/editor", response_model=None)
def editor_info(request: Request, who: Principal = Depends(principal)) -> dict:
    """The image editor's settings, saved LoRAs and bundled examples (404 when off)."""
    return editor_of(request).info()


@router.get("/v1/images/examples/{example_id}", response_model=None)
async def example(example_id: str, request: Request, who: Principal = Depends(principal)):
    """A bundled example (held-out photos): before, after, image and truth as base64 PNGs."""
    editor = editor_of(request)
    if example_id not in editor.info()["examples"]:
        raise APIError(404, f"no example {example_id!r}", code="example_not_found")
    found = await asyncio.to_thread(editor.example, example_id)
    images = {k: base64.b64encode(v).decode() for k, v in found["images"].items()}
    return {"id": found["id"], "label": found["label"], "images": images}
