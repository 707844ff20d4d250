"""Image files: finding them, reading them safely (with a decompression-bomb limit), and batching them.

Which files a folder's images are is decided here once, for the commands' inputs and the training
folders alike (`list_images`): searched recursively, hidden files and folders left out, in timm's
natural order; training folders also keep only timm's extensions (`IMAGE_EXTENSIONS`).

Kept apart from the transforms, which take images already in memory: this module is the one that
touches the file system, and every failure to read a file is an OSError naming it, so a command can
report the file and go on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nfnet_jax.data.transforms import EvalTransform, ImageLike, to_rgb
from nfnet_jax.files import display_name

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')  # timm's ImageFolder reads these, and only these


def set_max_image_pixels(pixels: int | None) -> None:
    """PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, a process-wide setting) for every image read
    after this: larger images are refused by `load_image`, by name. None or 0 lifts the limit."""
    if pixels is not None and pixels < 0:
        raise ValueError(f'the image pixel limit must be positive (0: none), not {pixels}')
    Image.MAX_IMAGE_PIXELS = pixels or None


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file as RGB; any failure is an OSError naming the file.

    A truncated or non-image file, an empty (0-pixel) image, and one larger than PIL's
    decompression-bomb limit (`set_max_image_pixels`; PIL itself only warns up to twice it) fail
    here, so a caller can report the file and go on.
    """
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as image:
            if limit and image.width * image.height > limit:
                raise Image.DecompressionBombError(f'Image size ({image.width * image.height} pixels)')
            if image.width * image.height == 0:
                raise ValueError(f'an empty image ({image.width}x{image.height} pixels)')
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError as err:  # PIL's own, at twice the limit, or ours above
        found = re.search(r'\((\d+) pixels\)', str(err))
        size = f'{int(found[1]):,} pixels' if found else 'too many pixels'
        raise OSError(
            f'{display_name(path)}: refused: {size}, over the limit of {limit:,} (a decompression bomb?); '
            'raise the limit with --max-image-pixels (set_max_image_pixels) if it is a real image'
        ) from None
    except Exception as err:  # PIL reports bad files with OSError, SyntaxError, ValueError, struct.error, ...
        raise OSError(f'{display_name(path)}: not a readable image ({type(err).__name__}: {err})') from None


def load_batch(images: Sequence[ImageLike | str | os.PathLike], transform: EvalTransform | Any) -> np.ndarray:
    """Images or image paths through `transform`, stacked into one float32 NHWC batch.

    Every file is tried; if any cannot be read, one OSError names each of them.
    """
    arrays, errors = [], []
    for image in images:
        try:
            arrays.append(transform(load_image(image) if isinstance(image, (str, os.PathLike)) else image))
        except OSError as err:
            errors.append(str(err))
    if errors:
        raise OSError(f'{len(errors)} of {len(images)} images could not be read:\n' + '\n'.join(errors))
    return np.stack(arrays)


def natural_key(text: str) -> list[Any]:
    """timm's sort key: digit runs compare as numbers ('class2' < 'class10'), case ignored."""
    return [int(s) if s.isdigit() else s for s in re.split(r'(\d+)', text.lower())]


def natural_order(paths: Iterable[Path]) -> list[Path]:
    """`paths` in timm's order (`natural_key` of the whole path); paths equal but for case, by their text."""
    return sorted(paths, key=lambda path: (natural_key(str(path)), str(path)))


def is_hidden(name: str) -> bool:
    """A hidden file or folder (its name starts with '.'): never an image of a folder, nor a folder searched."""
    return name.startswith('.')


def list_images(folder: Path, extensions: Sequence[str] | None = None) -> list[Path]:
    """The files under `folder`, searched recursively through links, in timm's order (`natural_order`).

    Hidden files and folders are left out, and, when `extensions` are given, every file whose
    extension (in any case) is not one of them. A link that leads nowhere (dangling, or a loop) is
    listed like a file, to be reported by name when it is read; a folder reached twice through
    links is searched once.
    """
    found, searched = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        stat = os.stat(dirpath)
        if (stat.st_dev, stat.st_ino) in searched:
            dirnames.clear()
            continue
        searched.add((stat.st_dev, stat.st_ino))
        dirnames[:] = [name for name in dirnames if not is_hidden(name)]
        for name in filenames:
            path = Path(dirpath, name)
            if is_hidden(name) or (extensions is not None and path.suffix.lower() not in extensions):
                continue
            if path.is_file() or path.is_symlink():  # not a FIFO or a device, which a read would hang on
                found.append(path)
    return natural_order(found)


def find_images(inputs: Sequence[Path]) -> list[Path]:
    """The commands' inputs: the files named, and every file `list_images` finds under the folders named.

    Files of every extension are listed, so that a folder's file that is not an image is reported
    by name when it is read rather than skipped in silence (and PIL reads more formats than timm's
    ImageFolder takes).
    """
    files = []
    for path in inputs:
        if path.is_dir():
            files += list_images(path)
        elif path.is_file():
            files.append(path)
        elif str(path) == '-':
            raise FileNotFoundError("'-': images cannot be read from standard input; name image files or folders")
        else:
            raise FileNotFoundError(f'{path}: no such file or folder')
    return files
