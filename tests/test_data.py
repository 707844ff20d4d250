"""Eval transforms, data configs, image loading and labels against timm's own.

Transforms are compared with `timm.data.create_transform(..., is_training=False)` on real
photographs (scikit-image's bundled images) and crops/resizes of them with odd sizes and
aspect ratios. Metric: max|ours - timm| over all pixels, required <= 1e-6 (it is 0 here:
the same PIL resize calls and the same float32 arithmetic).
"""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest
import skimage.data
import timm
import timm.data
from helpers import bomb_png
from PIL import Image

import nfnet_jax
from nfnet_jax import data
from nfnet_jax.data import loaders
from nfnet_jax.data.device import device_stage
from nfnet_jax.models.features import FeatureListNet
from nfnet_jax.models.nfnet import abstract_model
from nfnet_jax.models.pretrained import resolve_name

TRANSFORM_ATOL = 1e-6
PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'camera', 'logo')
# One tag per distinct kind of setting: squash at train and test size, center at 0.9 / 0.94 / 1.0, mean 0.5.
TAGS = ('dm_nfnet_f0.dm_in1k', 'eca_nfnet_l0.ra2_in1k', 'nf_resnet50.ra2_in1k', 'test_nfnet.r160_in1k')


def photo_variants() -> list[Image.Image]:
    """The photos as they are, and cut or squeezed to odd sizes and extreme aspect ratios."""
    variants = []
    for name in PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert('RGB')
        variants += [
            photo,
            photo.crop((3, 1, 100, photo.height - 2)),  # tall, odd
            photo.resize((37, 211)),  # very tall
            photo.resize((501, 13)),  # very wide, thinner than any crop
            photo.resize((7, 5)),  # tiny: upscaled
            photo.crop((0, 0, 161, 160)),  # one pixel off square
        ]
    return variants


def data_configs() -> list[dict]:
    """The eval configs of TAGS at train and test size, plus the other crop modes and interpolations."""
    configs = []
    for name in TAGS:
        for use_test_size in (False, True):
            config = data.resolve_model_data_config(nfnet_jax.pretrained_cfgs[name], use_test_size=use_test_size)
            if config not in configs:
                configs.append(config)
    configs += [
        dict(input_size=(3, 96, 128), crop_pct=0.875, crop_mode='center', interpolation='bilinear'),
        dict(input_size=(3, 64, 80), crop_pct=0.9, crop_mode='border', interpolation='bicubic'),
        dict(input_size=64, crop_pct=1.2, interpolation='lanczos'),  # crop larger than the resize: padded
        dict(input_size=(70, 50), crop_mode='squash', interpolation='bilinear', crop_pct=1.0),
    ]
    return configs


@pytest.fixture(scope='module')
def photos() -> list[Image.Image]:
    return photo_variants()


@pytest.mark.parametrize('config', data_configs(), ids=str)
def test_eval_transform_equals_timms_on_photos(photos, config):
    ours, theirs = data.create_transform(**config), timm.data.create_transform(**config, is_training=False)
    for photo in photos:
        expected = theirs(photo).numpy().transpose(1, 2, 0)
        got = ours(photo)
        assert got.dtype == np.float32 and got.shape == expected.shape, photo.size
        assert np.max(np.abs(got - expected)) <= TRANSFORM_ATOL, photo.size


def pil_in_mode(mode: str) -> Image.Image:
    rgb = Image.fromarray(skimage.data.chelsea()).resize((90, 61))
    if mode == 'I;16':
        return Image.fromarray(np.asarray(rgb.convert('L'), np.uint16) * 257)  # full 16-bit range
    if mode == 'P+transparency':
        paletted = rgb.convert('P')
        paletted.info['transparency'] = 0
        return paletted
    if mode in ('LA', 'RGBA'):
        image = rgb.convert(mode)
        image.putalpha(Image.linear_gradient('L').resize(rgb.size))
        return image
    return rgb.convert(mode)


@pytest.mark.parametrize('mode', ['L', 'LA', 'P', 'P+transparency', 'RGBA', 'CMYK', 'I;16', 'I', 'F', '1'])
def test_any_mode_becomes_rgb_as_timms_datasets_convert_it(mode):
    """timm's datasets call `img.convert('RGB')` before the transform; the result must be the same."""
    image = pil_in_mode(mode)
    assert image.mode == mode.split('+')[0]
    config = data.resolve_model_data_config(nfnet_jax.pretrained_cfgs['dm_nfnet_f0.dm_in1k'])
    expected = timm.data.create_transform(**config)(image.convert('RGB')).numpy().transpose(1, 2, 0)
    got = data.create_transform(**config)(image)
    assert got.shape == (192, 192, 3)
    assert np.max(np.abs(got - expected)) <= TRANSFORM_ATOL


def test_data_config_equals_timms_for_every_architecture():
    for name in nfnet_jax.list_models():
        timm_cfg = timm.models.get_pretrained_cfg(name).to_dict()
        cfg = resolve_name(name)[1]
        for use_test_size in (False, True):
            expected = timm.data.resolve_data_config(pretrained_cfg=timm_cfg, use_test_size=use_test_size)
            assert data.resolve_model_data_config(cfg, use_test_size=use_test_size) == expected, name


def test_data_config_of_models_and_feature_models_equals_timms():
    theirs = timm.create_model('test_nfnet.r160_in1k', device='meta')
    expected = timm.data.resolve_model_data_config(theirs)
    model = abstract_model(nfnet_jax.model_cfgs['test_nfnet'])
    model.pretrained_cfg = nfnet_jax.pretrained_cfgs['test_nfnet.r160_in1k']
    assert data.resolve_model_data_config(model) == expected
    assert data.resolve_model_data_config(FeatureListNet(model, (0,))) == expected
    without_cfg = timm.data.resolve_data_config(pretrained_cfg={'architecture': 'unknown'})
    assert data.resolve_model_data_config(object()) == without_cfg


def test_load_batch_takes_paths_images_and_arrays(tmp_path):
    photo = Image.fromarray(skimage.data.coffee())
    photo.save(tmp_path / 'coffee.png')
    photo.convert('L').save(tmp_path / 'gray.jpg')
    transform = data.create_transform(input_size=48, interpolation='bicubic')
    batch = data.load_batch([tmp_path / 'coffee.png', str(tmp_path / 'gray.jpg'), photo, np.asarray(photo)], transform)
    assert batch.shape == (4, 48, 48, 3) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0], transform(photo))
    np.testing.assert_array_equal(batch[1], transform(Image.open(tmp_path / 'gray.jpg')))
    np.testing.assert_array_equal(batch[2], batch[3])


def test_one_rule_finds_a_folders_images_for_the_commands_and_for_training(tmp_path):
    """Natural order (img2 before img10, case ignored), hidden files and folders left out, a link loop searched
    once; the commands list every such file (a non-image is reported when read), training only timm's extensions."""
    root = tmp_path / 'data'
    names = ['cat/img10.png', 'cat/img2.JPG', 'cat/.hidden.png', 'cat/.cache/img1.png', 'cat/notes.txt']
    names += ['Dog/sub/img1.jpeg', 'Dog/img1.png', '.trash/img0.png']
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b'pixels')
    (root / 'cat' / 'again').symlink_to(root / 'cat')
    found = data.find_images([root])
    expected = ['cat/img2.JPG', 'cat/img10.png', 'cat/notes.txt', 'Dog/img1.png', 'Dog/sub/img1.jpeg']
    assert [path.relative_to(root).as_posix() for path in found] == expected
    assert data.find_images([root / 'cat' / '.hidden.png']) == [root / 'cat' / '.hidden.png']  # named: taken
    samples = loaders.image_folder(root)
    assert samples.files == tuple(str(path) for path in found if path.suffix.lower() in data.IMAGE_EXTENSIONS)
    assert samples.class_names == ('cat', 'Dog') and samples.labels.tolist() == [0, 0, 1, 1]


def test_unreadable_files_fail_by_name(tmp_path):
    (tmp_path / 'notes.txt').write_text('not an image')
    Image.fromarray(skimage.data.coffee()).save(tmp_path / 'full.jpg')
    (tmp_path / 'cut.jpg').write_bytes((tmp_path / 'full.jpg').read_bytes()[:3000])
    for name in ('notes.txt', 'cut.jpg', 'missing.png'):
        with pytest.raises(OSError, match=name):
            data.load_image(tmp_path / name)


def test_every_image_failure_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', Image.MAX_IMAGE_PIXELS)  # restored after the test
    bomb = bomb_png(tmp_path / 'bomb.png')
    assert bomb.stat().st_size < 100
    with pytest.raises(OSError, match=r'bomb.png: refused: 10,000,000,000 pixels, over the limit of 89,478,485'):
        data.load_image(bomb)
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / 'small.png')
    data.set_max_image_pixels(5000)  # PIL itself would only warn below 10000 pixels
    with pytest.raises(OSError, match='small.png: refused: 10,000 pixels, over the limit of 5,000'):
        data.load_image(tmp_path / 'small.png')
    data.set_max_image_pixels(10_000)
    assert data.load_image(tmp_path / 'small.png').size == (100, 100)
    transform = data.create_transform(input_size=32)
    with pytest.raises(OSError, match=r'1 of 2 images could not be read:\n.*bomb.png: refused'):
        data.load_batch([tmp_path / 'small.png', bomb], transform)
    with pytest.raises(ValueError, match=r'an empty image \(0x0 pixels\)'):
        transform(np.zeros((0, 0, 3), np.uint8))


@pytest.mark.parametrize('crop_mode', ['center', 'border', 'squash'])
def test_memory_is_bounded_by_the_output_not_by_how_far_an_image_asks_to_be_resized(tmp_path, monkeypatch, crop_mode):
    # A 20000x1 PNG of a few hundred bytes would be resized to 256x5,120,000 before the crop, 1x2,000,000 to
    # 256x512,000,000: every resize must stay within MAX_RESIZE_FACTOR times the output's pixels.
    from nfnet_jax.data.transforms import MAX_RESIZE_FACTOR

    resized, resize = [], Image.Image.resize
    monkeypatch.setattr(
        Image.Image, 'resize', lambda self, size, *a, **k: resized.append(size) or resize(self, size, *a, **k)
    )
    transform = data.create_transform(input_size=(32, 48), crop_mode=crop_mode)
    for width, height in ((20_000, 1), (1, 2_000_000)):
        path = tmp_path / f'{width}x{height}.png'
        Image.new('RGB', (width, height), (200, 10, 10)).save(path)
        assert path.stat().st_size < 10_000
        pixels = transform(data.load_image(path))
        assert pixels.shape == (32, 48, 3)
        assert all(w * h <= MAX_RESIZE_FACTOR * 32 * 48 for w, h in resized), resized
        if crop_mode != 'border':  # the image fills the output (border pads with the mean)
            np.testing.assert_allclose(
                pixels[16, 24], data.create_transform(input_size=1)(np.array([[[200, 10, 10]]], np.uint8))[0, 0]
            )


def test_the_bounded_resize_keeps_the_region_the_full_resize_keeps(monkeypatch):
    from nfnet_jax.data import transforms

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 300, 3), np.uint8))
    transform = data.create_transform(input_size=32)
    full = transform(image)
    monkeypatch.setattr(transforms, 'MAX_RESIZE_FACTOR', 1)  # 36x1200 before the crop: now the bounded path
    bounded = transform(image)
    assert np.abs(full - bounded).max() <= 1.5 / 255 / min(transform.std)  # at most one 8-bit step apart


def test_list_files_name_the_file_and_line_of_every_bad_label(tmp_path):
    for name in ('a.png', 'b.png', 'c.png'):
        Image.new('RGB', (4, 4)).save(tmp_path / name)
    listing = tmp_path / 'list.csv'

    def read(text: str | bytes):
        listing.write_bytes(text if isinstance(text, bytes) else text.encode('utf-8'))
        return loaders.list_file(listing)

    # A byte-order mark does not hide the header; '007' is class 7.
    samples = read('\ufeffpath,label\na.png,0\nb.png,007\n')
    assert samples.labels.tolist() == [0, 7] and len(samples.class_names) == 8
    assert read('a.png,cat\nb.png,dog\n').class_names == ('cat', 'dog')
    refusals = [
        (b'a.png,0\nb.png,caf\xe9\n', r'list.csv: line 2 is not UTF-8 text .* save the list file as UTF-8'),
        ('a.png,0\n\nb.png,99999999999\n', r'list.csv: line 3: class index 99999999999 is over the limit of 1,000,000'),
        (
            'a.png,0\nb.png,1\nc.png,cat\n',
            r"list.csv: line 3: label 'cat' is a class name, but line 1 has the class index",
        ),
        (
            'a.png,\u00b2\nb.png,1\n',
            r"list.csv: line 1: label '\u00b2' is a class name, but line 2 has the class index",
        ),
    ]
    for text, message in refusals:
        with pytest.raises(ValueError, match=message):
            read(text)
    with pytest.raises(ValueError, match=r"list.csv: line 1: labels \['\u00b2'\] are not among the classes"):
        loaders.list_file(listing, class_names=['0', '1'])


def test_bad_settings_say_what_exists():
    with pytest.raises(ValueError, match='bicubic'):
        data.create_transform(interpolation='cubic')
    with pytest.raises(ValueError, match='squash'):
        data.create_transform(crop_mode='middle')
    with pytest.raises(ValueError, match='pixel'):
        data.create_transform(is_training=True, re_mode='noise')
    with pytest.raises(TypeError, match='uint8'):
        data.create_transform()(np.zeros((8, 8, 3), np.float32))


def test_imagenet_labels_equal_timms():
    info = timm.data.ImageNetInfo()
    labels, synsets = data.imagenet_labels(), data.imagenet_synsets()
    assert len(labels) == len(synsets) == 1000
    assert labels == [info.index_to_description(i) for i in range(1000)]
    assert synsets == [info.index_to_label_name(i) for i in range(1000)]
    assert labels[0] == 'tench, Tinca tinca'


def test_batches_read_in_worker_processes_in_order_with_the_pixel_limit(tmp_path, monkeypatch):
    """grain worker processes read the files in order, uint8 with a host part; unreadable files are reported in
    order and skipped (the batches regrouped to full size); the caller's pixel limit holds in the workers."""
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', Image.MAX_IMAGE_PIXELS)  # restored after the test
    photo = Image.fromarray(skimage.data.coffee())
    files = []
    for i in range(7):
        files.append(tmp_path / f'{i}.jpg')
        photo.crop((i, 0, 100 + 10 * i, 100)).save(files[-1])
    (tmp_path / 'notes.txt').write_text('not an image')
    Image.new('RGB', (200, 200)).save(tmp_path / 'large.png')  # 40,000 pixels: over the limit below
    files[2:2] = [tmp_path / 'notes.txt', tmp_path / 'large.png']
    data.set_max_image_pixels(35_000)
    transform = data.create_transform(input_size=32).host_part()
    errors = []
    got = list(loaders.batches(files, transform, 3, lambda path, message: errors.append((path, message)), workers=2))
    assert [e[0].name for e in errors] == ['notes.txt', 'large.png'] and 'over the limit of 35,000' in errors[1][1]
    assert [[p.stem for p in paths] for paths, _ in got] == [['0', '1', '2'], ['3', '4', '5'], ['6']]
    for paths, images in got:
        assert images.dtype == np.uint8
        np.testing.assert_array_equal(images, np.stack([transform(data.load_image(p)) for p in paths]))


def test_loaders_give_uint8_batches_of_a_host_part_that_the_device_part_finishes(tmp_path):
    """TrainLoader and EvalLoader with host parts: uint8 batches (eval padding zeros, labels -1) whose device part
    equals the float transform's batch; through worker processes, exactly len(loader) batches."""
    for i in range(10):
        (tmp_path / f'c{i % 2}').mkdir(exist_ok=True)
        Image.fromarray(skimage.data.astronaut()[8 * i :, 5 * i :]).save(tmp_path / f'c{i % 2}' / f'{i}.jpg')
    samples = loaders.image_folder(tmp_path)
    train = data.create_transform(40, is_training=True, auto_augment='rand-m9-mstd0.5-inc1')
    evaluate = data.create_transform(40)
    for transform, make in (
        (train, lambda t, **kw: loaders.TrainLoader(samples, t, 4, epochs=2, process_index=0, process_count=1, **kw)),
        (evaluate, lambda t, **kw: loaders.EvalLoader(samples, t, 4, process_index=0, process_count=1, **kw)),
    ):
        floats, host = make(transform), make(transform.host_part(), workers=2)
        batches = list(host)
        assert len(batches) == len(host) == len(floats)
        stage = jax.jit(device_stage(transform))
        for index, batch in enumerate(batches):
            expected = floats.batch(index)
            assert batch.images.dtype == np.uint8 and batch.step == index
            np.testing.assert_array_equal(batch.labels, expected.labels)
            rows = expected.labels >= 0  # padding: zero pixels either way, left out of every sum
            np.testing.assert_array_equal(np.asarray(stage(batch.images))[rows], expected.images[rows])
    assert np.all(batches[-1].images[2:] == 0) and batches[-1].labels.tolist()[2:] == [-1, -1]


LEFT_TO_THE_EXIT = """
import gc
from nfnet_jax.data import loaders


class Holder:
    pass


def start():
    holder = Holder()
    holder.me = holder
    holder.batches = loaders.iterate(lambda i: i, 100, workers=0)
    next(holder.batches)


gc.disable()
start()  # the iterator is left in a reference cycle, collected while the interpreter exits
raise PermissionError(13, 'Permission denied', 'curves.png')
"""


def test_a_batch_iterator_left_to_the_exit_does_not_hang_it():
    """A run that fails mid-epoch (a folder made read-only) leaves its loader to the interpreter's exit, where
    no thread can start any more: closing it there must not wait for one."""
    result = subprocess.run([sys.executable, '-c', LEFT_TO_THE_EXIT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and 'PermissionError' in result.stderr, result.stderr[-2000:]
