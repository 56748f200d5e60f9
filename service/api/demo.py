"""The demo chat page at `/`."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def demo_page() -> HTMLResponse:
    """A chat on any channel, showing which worker each tab is connected to."""
    return HTMLResponse(files("service").joinpath("static/index.html").read_text("utf-8"))
