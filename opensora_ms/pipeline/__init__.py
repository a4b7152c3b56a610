"""Open-Sora 2.0 sampling on MindSpore (docs/pipeline.md).

- `plan`: options, buckets, latent sizes, schedule, prompts, conditions (numpy; no framework);
- `media`: reference images/videos in, uint8 frames and mp4/PNG out (PyAV, PIL);
- `sampling`: the denoising loop, frame replacement and decode on MindSpore;
- `api`: `generate(...)` end to end from a converted weights folder (what `msconv generate` and `msconv demo` call).

`generate`, `Request` and `make_plan` are importable from here; MindSpore is imported only when they run.
"""


def generate(*args, **kwargs):
    """`opensora_ms.pipeline.api.generate` (see there)."""
    from .api import generate as _generate

    return _generate(*args, **kwargs)


def make_plan(req):
    from .api import make_plan as _make_plan

    return _make_plan(req)


def __getattr__(name):
    if name in ("Request", "Result", "GenerateError"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
