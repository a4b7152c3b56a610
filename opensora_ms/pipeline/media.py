"""Reference images/videos in, uint8 frames and mp4/PNG files out -- upstream's IO without torchvision.

Reading (`opensora/datasets/utils.py`, `video_transforms.py`): images go through PIL (RGB) -> `resize_crop_to_fill`
(bicubic resize to cover the target, centre crop) -> /255 -> (x-0.5)/0.5; videos are decoded with PyAV (RGB) ->
/255 -> bilinear resize (torch `F.interpolate(align_corners=False)`, no antialias) to cover the target -> crop
-> normalise. Result: (C, T, H, W) float32 in [-1, 1].

Writing (`save_sample`, SPEC §f.9): clamp to [-1, 1], (x+1)/2, *255 + 0.5, clamp [0, 255], truncate to uint8 --
in the decoder's dtype (bf16 emulated when asked: x*255+0.5 in bf16 moves values above 128 by up to one level);
mp4 through PyAV (h264, crf 23, yuv420p, upstream's 24 fps), one frame -> PNG. Files appear atomically (a
temporary name in the same folder, renamed when complete).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["MediaError", "IMAGE_EXTS", "VIDEO_EXTS", "read_reference", "resize_crop_image", "resize_crop_video",
           "to_uint8", "write_video", "write_png", "probe_video", "read_video_frames"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv")


class MediaError(ValueError):
    """A reference file that cannot be read, or an output that cannot be written (user error)."""


# ------------------------------------------------------------------------------------------------ reading
def resize_crop_image(img, size_hw: tuple[int, int]) -> np.ndarray:
    """PIL image -> (H, W, 3) uint8: bicubic resize so it covers `size_hw`, then centre crop (resize_crop_to_fill)."""
    from PIL import Image

    w, h = img.size
    th, tw = size_hw
    rh, rw = th / h, tw / w
    if rh > rw:
        sh, sw = th, round(w * rh)
        img = img.resize((sw, sh), Image.BICUBIC)
        i, j = 0, int(round((sw - tw) / 2.0))
    else:
        sh, sw = round(h * rw), tw
        img = img.resize((sw, sh), Image.BICUBIC)
        i, j = int(round((sh - th) / 2.0)), 0
    arr = np.asarray(img)
    return arr[i:i + th, j:j + tw]


def _bilinear_axis(n_in: int, n_out: int):
    """Source indices and weights of torch's bilinear (align_corners=False) along one axis, in float32."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, lam


def _resize_bilinear(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """(T, C, H, W) float32 -> (T, C, h, w) float32."""
    h0, h1, lh = _bilinear_axis(x.shape[-2], out_hw[0])
    w0, w1, lw = _bilinear_axis(x.shape[-1], out_hw[1])
    rows = x[..., h0, :] * (1 - lh)[:, None] + x[..., h1, :] * lh[:, None]
    return (rows[..., w0] * (1 - lw) + rows[..., w1] * lw).astype(np.float32)


def resize_crop_video(frames: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(T, C, H, W) float32 in [0, 1] -> (T, C, th, tw): bilinear resize to cover, then crop (video_transforms
    `resize_crop_to_fill`, whose crop offset is int(round(excess) / 2))."""
    h, w = frames.shape[-2:]
    th, tw = size_hw
    rh, rw = th / h, tw / w
    if rh > rw:
        sh, sw = th, round(w * rh)
        frames = _resize_bilinear(frames, (sh, sw))
        i, j = 0, int(round(sw - tw) / 2.0)
    else:
        sh, sw = round(h * rw), tw
        frames = _resize_bilinear(frames, (sh, sw))
        i, j = int(round(sh - th) / 2.0), 0
    return frames[..., i:i + th, j:j + tw]


def _normalize(x: np.ndarray) -> np.ndarray:
    return ((x - np.float32(0.5)) / np.float32(0.5)).astype(np.float32)


def read_video_frames(path: str | os.PathLike) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB frames of a video (PyAV)."""
    import av

    try:
        with av.open(str(path)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    except (av.error.FFmpegError, OSError, IndexError) as e:
        raise MediaError(f"{path}: cannot read video ({e})") from e
    if not frames:
        raise MediaError(f"{path}: no video frames")
    return np.stack(frames)


def read_reference(path: str | os.PathLike, size_hw: tuple[int, int]) -> np.ndarray:
    """An image or a video as upstream's `read_from_path(..., transform_name="resize_crop")`: (3, T, H, W) float32
    in [-1, 1] (T = 1 for images)."""
    p = Path(path)
    if not p.is_file():
        raise MediaError(f"{p}: reference file does not exist")
    ext = p.suffix.lower()
    if ext in VIDEO_EXTS:
        v = read_video_frames(p).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        v = _normalize(resize_crop_video(v, size_hw))
        return np.ascontiguousarray(v.transpose(1, 0, 2, 3))
    if ext not in IMAGE_EXTS:
        raise MediaError(f"{p}: unsupported reference format {ext!r} (images: {', '.join(IMAGE_EXTS)}; videos: "
                         f"{', '.join(VIDEO_EXTS)})")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise MediaError(f"{p}: cannot read image ({e})") from e
    arr = resize_crop_image(img, size_hw).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(_normalize(arr).transpose(2, 0, 1)[:, None])


# ------------------------------------------------------------------------------------------------ writing
def _bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest even), kept in float32."""
    b = np.ascontiguousarray(a, np.float32).view(np.uint32)
    b = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return b.view(np.float32)


def to_uint8(x: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """One sample (C, T, H, W) in [-1, 1] -> (T, H, W, C) uint8, rounding after every op in `dtype` as upstream's
    in-place ops on the decoder output do."""
    r = _bf16 if dtype == "bfloat16" else (lambda a: a.astype(np.float32))
    y = r(np.clip(np.asarray(x, np.float32), -1, 1))
    y = r(r(y + np.float32(1)) / np.float32(2))
    y = r(r(y * np.float32(255)) + np.float32(0.5))
    y = np.clip(y, 0, 255)
    return np.ascontiguousarray(y.astype(np.uint8).transpose(1, 2, 3, 0))


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise MediaError(f"{path.parent}: output folder does not exist")
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_video(path, frames: np.ndarray, fps: int = 24, crf: int = 23) -> Path:
    """(T, H, W, 3) uint8 -> an h264 mp4 (yuv420p, crf), as torchvision's write_video does it."""
    import av

    t, h, w, c = frames.shape
    if c != 3 or h % 2 or w % 2:
        raise MediaError(f"{path}: h264/yuv420p needs 3 channels and even sizes, got {w}x{h}x{c}")

    def write(tmp):
        with av.open(str(tmp), mode="w", format="mp4") as out:
            st = out.add_stream("libx264", rate=int(fps))
            st.width, st.height, st.pix_fmt = w, h, "yuv420p"
            st.options = {"crf": str(crf)}
            for f in frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
                for pkt in st.encode(frame):
                    out.mux(pkt)
            for pkt in st.encode():
                out.mux(pkt)

    return _atomic(Path(path), write)


def write_png(path, frame: np.ndarray) -> Path:
    """(H, W, 3) uint8 -> PNG."""
    from PIL import Image

    return _atomic(Path(path), lambda tmp: Image.fromarray(frame).save(tmp, format="PNG"))


def probe_video(path) -> dict:
    """{"frames", "fps", "width", "height", "codec"} of a written video, by decoding every frame."""
    import av

    with av.open(str(path)) as c:
        st = c.streams.video[0]
        n = sum(1 for _ in c.decode(video=0))
        return {"frames": n, "fps": float(st.average_rate), "width": st.codec_context.width,
                "height": st.codec_context.height, "codec": st.codec_context.name}
