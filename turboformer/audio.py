"""Audio frontend shared by every speech model: decode, resample, log-mel (Whisper), fbank (WeNet).

Three stages, each usable alone:

1. ``load_audio``: any file FFmpeg can demux (wav, flac, mp3, m4a/aac, ogg/opus, video containers) or headerless
   s16le PCM, decoded with PyAV and resampled to 16 kHz mono float32 in [-1, 1].
2. ``log_mel_spectrogram``: Whisper's input features, equal to ``whisper.audio.log_mel_spectrogram`` (openai-whisper)
   and to Hugging Face's ``WhisperFeatureExtractor``.
3. ``kaldi_fbank``: Kaldi-compatible log mel filterbank, equal to ``torchaudio.compliance.kaldi.fbank`` as WeNet
   calls it (and to ``kaldi_native_fbank``).
"""

from __future__ import annotations

import io
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import torch

if TYPE_CHECKING:  # PyAV is imported where a file is decoded, so array-only use needs no FFmpeg
    import av  # noqa: PLC0415 (lazy: FFmpeg only where a file is decoded)

import torch.nn.functional as F

SAMPLE_RATE = 16000  # Hz: every model here consumes 16 kHz mono
N_FFT = 400  # 25 ms Whisper STFT window
HOP_LENGTH = 160  # 10 ms between mel frames
CHUNK_LENGTH = 30  # seconds in one Whisper input window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a window

RAW_EXTENSIONS = (".raw", ".pcm")  # headerless s16le PCM, 16 kHz unless told otherwise

# A file whose decodable audio falls this much short of the length its header declares is truncated or corrupt.
# Intact files differ by codec delay only (Opus pre-skip: 6.5 ms; AAC and MP3 decode slightly *more*).
_TRUNCATION_TOLERANCE_S = 0.1

# Demuxers whose duration comes from an exact length field: FLAC STREAMINFO, the MP4 sample table, the Matroska
# Duration element (used for audio-only files), the last Ogg granule position (which shows corruption in the middle,
# not a clean cut); MP3 only with a Xing/Info/VBRI tag (``_mp3_has_length_tag``). Other demuxers (ADTS AAC, untagged
# MP3, ...) may estimate the duration from the bit rate, which is far off for variable bit rates: not checked.
_EXACT_LENGTH_DEMUXERS = frozenset({"flac", "ogg", "matroska,webm", "mov,mp4,m4a,3gp,3g2,mj2"})


class AudioError(ValueError):
    """An input that cannot be decoded as audio; the one-line message names the input and the cause."""


# ---------------------------------------------------------------------------------------------------------------
# Decoding and resampling
# ---------------------------------------------------------------------------------------------------------------


def load_audio(
    source: str | os.PathLike | bytes,
    sample_rate: int = SAMPLE_RATE,
    raw_sample_rate: int | None = None,
) -> np.ndarray:
    """Decode an audio (or video) file to mono float32 samples at ``sample_rate``.

    Args:
        source: a local file path, or the bytes of a whole file held in memory. Only local files are read (no
            URLs or FFmpeg protocols). For containers with several audio streams the first one is decoded; video
            streams are ignored.
        sample_rate: output rate in Hz.
        raw_sample_rate: if given, ``source`` is headerless signed 16-bit little-endian mono PCM at this rate.
            A path ending in ``.raw`` or ``.pcm`` is read that way too, at 16000 Hz unless this says otherwise.

    Returns:
        ``[n_samples]`` float32 in [-1, 1]. Channels are averaged (FFmpeg's downmix matrix, normalised so that no
        gain is added) and the rate converted with FFmpeg's resampler (libswresample defaults, the same path as
        the ``ffmpeg`` command openai-whisper runs), in float, then clipped to [-1, 1]. A valid file holding zero
        samples gives an empty array: the caller decides whether that is an error.

    Raises:
        AudioError: missing or unreadable path, empty file, not an audio or video file, no audio stream,
            truncated or corrupt data. Truncation is detected where the file states its own length (WAV, FLAC,
            MP4/M4A/MOV, audio-only Matroska/WebM, MP3 with a Xing/Info/VBRI tag): a shortfall over 0.1 s raises.
            Ogg, ADTS AAC, untagged MP3 and Matroska with video state no audio length, so there a file cut
            cleanly between packets reads as a shorter file.
        ValueError: a bad ``sample_rate`` or ``raw_sample_rate``.
    """
    _check_rate("sample_rate", sample_rate)
    if raw_sample_rate is not None:
        _check_rate("raw_sample_rate", raw_sample_rate)

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = f"<in-memory audio, {len(data)} bytes>"
        if not data:
            raise AudioError(f"cannot load audio from {name}: the input is empty")
        if raw_sample_rate is not None:
            return _decode_raw(data, raw_sample_rate, sample_rate, name)
        return _decode_container(io.BytesIO(data), sample_rate, name)

    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_audio expects a path or bytes, got {type(source).__name__}")
    path = os.fspath(source)
    name = repr(path)
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise AudioError(f"cannot load audio from {name}: no such file") from None
    except IsADirectoryError:
        raise AudioError(f"cannot load audio from {name}: it is a directory") from None
    except PermissionError:
        raise AudioError(f"cannot load audio from {name}: permission denied") from None
    except OSError as error:
        raise AudioError(f"cannot load audio from {name}: {error.strerror or error}") from None
    with file:
        if os.fstat(file.fileno()).st_size == 0:
            raise AudioError(f"cannot load audio from {name}: the file is empty (0 bytes)")
        if raw_sample_rate is None and path.lower().endswith(RAW_EXTENSIONS):
            raw_sample_rate = SAMPLE_RATE
        if raw_sample_rate is not None:
            return _decode_raw(file.read(), raw_sample_rate, sample_rate, name)
        return _decode_container(file, sample_rate, name)


def _check_rate(what: str, rate: int) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise ValueError(f"{what} must be a positive integer number of Hz, got {rate!r}")


def _decode_raw(data: bytes, raw_rate: int, out_rate: int, name: str) -> np.ndarray:
    """Headerless s16le mono PCM bytes -> ``[n]`` float32 at ``out_rate``."""
    import av  # noqa: PLC0415 (lazy: FFmpeg only where a file is decoded)

    if len(data) % 2:
        raise AudioError(
            f"cannot load audio from {name}: raw s16le PCM needs an even number of bytes, got {len(data)} "
            "(truncated file?)"
        )
    pcm = np.frombuffer(data, dtype="<i2").astype(np.int16)  # [n] native-endian copy

    def frames() -> Iterator[av.AudioFrame]:
        for start in range(0, len(pcm), raw_rate):  # 1 s frames keep the resampler's buffers small
            frame = av.AudioFrame.from_ndarray(pcm[None, start : start + raw_rate], format="s16", layout="mono")
            frame.sample_rate = raw_rate
            yield frame

    return _resample(frames(), out_rate)


def _decode_container(file: BinaryIO, out_rate: int, name: str) -> np.ndarray:
    """Demux and decode the first audio stream of ``file`` -> ``[n]`` float32 at ``out_rate``."""
    import av  # noqa: PLC0415 (lazy: FFmpeg only where a file is decoded)

    def fail(cause: str) -> AudioError:
        return AudioError(f"cannot load audio from {name}: {' '.join(cause.split())}")

    try:
        container = av.open(file, mode="r")
    except av.error.EOFError:
        raise fail("truncated: the file ends before its header is complete") from None
    except av.error.InvalidDataError:
        raise fail("not a recognised audio or video file, or its header is damaged (FFmpeg: invalid data)") from None
    except av.FFmpegError as error:
        raise fail(f"FFmpeg cannot open it ({error.strerror})") from None
    except OSError as error:
        raise fail(f"read error ({error})") from None

    with container:
        if not container.streams.audio:
            kinds = Counter(stream.type for stream in container.streams)
            found = ", ".join(f"{count} {kind} stream{'s' if count > 1 else ''}" for kind, count in kinds.items())
            raise fail(f"no audio stream (the file holds {found or 'no streams'})")
        stream = container.streams.audio[0]
        rate = stream.rate or stream.codec_context.sample_rate
        if not rate:
            raise fail(f"the audio stream ({stream.codec_context.name}) states no sample rate")
        n_decoded = 0  # samples, at the stream's own rate

        def frames() -> Iterator[av.AudioFrame]:
            nonlocal n_decoded
            try:
                for frame in container.decode(stream):
                    n_decoded += frame.samples
                    yield frame
            except av.FFmpegError as error:
                raise fail(f"corrupt or truncated data after {n_decoded / rate:.2f} s ({error.strerror})") from None
            except OSError as error:
                raise fail(f"read error ({error})") from None

        audio = _resample(frames(), out_rate)
        declared_s = _declared_duration_s(container, stream, file)
        if declared_s is not None and n_decoded / rate < declared_s - _TRUNCATION_TOLERANCE_S:
            raise fail(
                f"truncated or corrupt: the header declares {declared_s:.3f} s of audio but only "
                f"{n_decoded / rate:.3f} s could be decoded"
            )
        return audio


def _resample(frames: Iterable[av.AudioFrame], out_rate: int) -> np.ndarray:
    """Downmix to mono and resample decoded frames -> ``[n]`` float32 in [-1, 1].

    ``rematrix_maxval=1`` makes libswresample normalise its downmix matrix as it does for integer output
    (stereo -> (L + R) / 2); for float output it would otherwise keep the unnormalised sqrt(1/2) (L + R),
    which leaves [-1, 1]. A stream whose format, layout or rate changes midway gets a new resampler.
    """
    import av  # noqa: PLC0415 (lazy: FFmpeg only where a file is decoded)

    chunks = []  # [1, n_i] float32 each
    resampler, setup = None, None
    for frame in frames:
        frame_setup = (frame.format.name, frame.layout.name, frame.sample_rate)
        if frame_setup != setup:
            if resampler is not None:
                chunks += [out.to_ndarray() for out in resampler.resample(None)]  # flush the previous setup
            resampler = av.AudioResampler("flt", "mono", out_rate, options={"rematrix_maxval": "1.0"})
            setup = frame_setup
        chunks += [out.to_ndarray() for out in resampler.resample(frame)]
    if resampler is not None:
        chunks += [out.to_ndarray() for out in resampler.resample(None)]  # flush: the filter holds back a tail
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    audio = np.concatenate([chunk.reshape(-1) for chunk in chunks]).astype(np.float32, copy=False)
    return np.clip(audio, -1.0, 1.0, out=audio)


def _declared_duration_s(
    container: av.container.InputContainer, stream: av.AudioStream, file: BinaryIO
) -> float | None:
    """Length of ``stream`` in seconds as the file's header states it; None where no exact length is stated."""
    import av  # noqa: PLC0415 (lazy: FFmpeg only where a file is decoded)

    wav = _wav_declared_duration_s(file)
    if wav is not None:  # FFmpeg clamps a WAV's duration to the bytes present, so its header is read here
        return wav
    name = container.format.name
    if not (name in _EXACT_LENGTH_DEMUXERS or (name == "mp3" and _mp3_has_length_tag(file))):
        return None
    if stream.duration is not None and stream.time_base is not None:
        start = stream.start_time if stream.start_time and stream.start_time > 0 else 0  # a leading gap: not decoded
        return float((stream.duration - start) * stream.time_base)
    if container.duration is not None and len(container.streams) == 1:  # Matroska: only the file's duration
        return container.duration / av.time_base
    return None


def _wav_declared_duration_s(file: BinaryIO) -> float | None:
    """Seconds of audio a RIFF/WAVE header declares (``data`` bytes / ``fmt`` byte rate), or None.

    None also where the size is left unknown: streaming writers put 0 or 0xFFFFFFFF there.
    """
    size = file.seek(0, io.SEEK_END)
    file.seek(0)
    header = file.read(12)
    if header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return None
    position, byte_rate = 12, 0
    while position + 8 <= size:
        file.seek(position)
        chunk = file.read(20)  # id, size, then the first 12 bytes of the body
        chunk_size = int.from_bytes(chunk[4:8], "little")
        if chunk[:4] == b"fmt " and len(chunk) == 20:
            byte_rate = int.from_bytes(chunk[16:20], "little")  # WAVEFORMAT.nAvgBytesPerSec, body bytes 8..12
        if chunk[:4] == b"data":
            if chunk_size in (0, 0xFFFFFFFF) or byte_rate == 0:
                return None
            return chunk_size / byte_rate
        position += 8 + chunk_size + (chunk_size & 1)  # RIFF chunks are padded to an even size
    return None


def _mp3_has_length_tag(file: BinaryIO) -> bool:
    """Whether the first MPEG audio frame is a Xing/Info/VBRI header, which states the stream's frame count."""
    file.seek(0)
    head = file.read(10)
    offset = 0
    if len(head) == 10 and head[:3] == b"ID3":  # ID3v2 tag: 10-byte header, 28-bit syncsafe size, maybe a footer
        offset = 10 + ((head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | head[9] & 0x7F)
        offset += 10 if head[5] & 0x10 else 0
    file.seek(offset)
    data = file.read(4096)
    for sync in range(len(data) - 1):
        if data[sync] == 0xFF and data[sync + 1] & 0xE0 == 0xE0:  # 11 set bits open a frame header
            first_frame = data[sync : sync + 200]  # Xing/Info follow the side information (<= 36 bytes), VBRI 36
            return any(tag in first_frame for tag in (b"Xing", b"Info", b"VBRI"))
    return False


def pad_or_trim(array: np.ndarray | torch.Tensor, length: int = N_SAMPLES, axis: int = -1) -> np.ndarray | torch.Tensor:
    """Zero-pad or cut ``array`` along ``axis`` to exactly ``length`` (Whisper's 30 s window by default).

    A cut returns a view of the input (no copy); a pad returns a new array of the same type, dtype and device.
    """
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    size = array.shape[axis]
    if size >= length:
        if torch.is_tensor(array):
            return array.narrow(axis, 0, length)
        index = [slice(None)] * array.ndim
        index[axis] = slice(0, length)
        return array[tuple(index)]
    if torch.is_tensor(array):
        pad = [0, 0] * array.ndim  # F.pad lists (left, right) pairs from the last dimension backwards
        pad[2 * (array.ndim - 1 - axis % array.ndim) + 1] = length - size
        return F.pad(array, pad)
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, length - size)
    return np.pad(array, widths)


# ---------------------------------------------------------------------------------------------------------------
# Whisper log-mel spectrogram
# ---------------------------------------------------------------------------------------------------------------


def _hz_to_mel_slaney(hz: torch.Tensor) -> torch.Tensor:
    """Slaney's Auditory Toolbox mel scale: linear (3 mels / 200 Hz) below 1 kHz, logarithmic above."""
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    return torch.where(hz >= min_log_hz, min_log_mel + torch.log(hz / min_log_hz) / logstep, hz / f_sp)


def _mel_to_hz_slaney(mel: torch.Tensor) -> torch.Tensor:
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    return torch.where(mel >= min_log_mel, min_log_hz * torch.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def mel_filters(n_mels: int, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> torch.Tensor:
    """Slaney-normalised mel filter bank, ``[n_mels, 1 + n_fft // 2]`` float32 (a new tensor on every call).

    Equals ``librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, htk=False, norm="slaney")``, the
    matrices Whisper ships as ``mel_filters.npz``: triangles between ``n_mels + 2`` points evenly spaced on the
    Slaney mel scale from 0 Hz to Nyquist, each scaled by 2 / (its width in Hz) so that every filter has unit
    area. Computed in float64 and rounded to float32 at the same two points as librosa.
    """
    if n_mels <= 0 or n_fft <= 0 or sample_rate <= 0:
        raise ValueError(
            f"mel_filters needs positive sizes, got n_mels={n_mels}, sample_rate={sample_rate}, n_fft={n_fft}"
        )
    fft_hz = torch.arange(1 + n_fft // 2, dtype=torch.float64) * (sample_rate / n_fft)  # [F] rfft bin frequencies
    mel_max = _hz_to_mel_slaney(torch.tensor(sample_rate / 2, dtype=torch.float64))
    edges_hz = _mel_to_hz_slaney(torch.linspace(0, float(mel_max), n_mels + 2, dtype=torch.float64))  # [n_mels + 2]
    widths = edges_hz.diff()  # [n_mels + 1]
    ramps = edges_hz[:, None] - fft_hz[None, :]  # [n_mels + 2, F]
    rising = -ramps[:-2] / widths[:-1, None]  # [n_mels, F]
    falling = ramps[2:] / widths[1:, None]
    triangles = torch.clamp(torch.minimum(rising, falling), min=0).float()  # librosa stores these in float32 ...
    area_norm = 2.0 / (edges_hz[2:] - edges_hz[:-2])  # [n_mels]
    return (triangles.double() * area_norm[:, None]).float()  # ... then scales them in float64


@lru_cache(maxsize=None)
def _cached_mel_filters(n_mels: int, device: torch.device) -> torch.Tensor:
    return mel_filters(n_mels).to(device)  # internal: never handed to callers, so never mutated


@lru_cache(maxsize=None)
def _cached_window(kind: str, size: int, device: torch.device) -> torch.Tensor:
    if kind == "hann":  # periodic, as torch.stft users (Whisper) build it
        return torch.hann_window(size, device=device)
    return torch.hann_window(size, periodic=False, device=device).pow(0.85)  # Kaldi's "povey" window


def log_mel_spectrogram(
    audio: np.ndarray | torch.Tensor,
    n_mels: int = 80,
    padding: int = 0,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Whisper's log-mel spectrogram of 16 kHz audio.

    STFT with a 400-sample periodic Hann window and hop 160 (``center=True``, reflect padding), the last frame
    dropped, power spectrum, Slaney mel filters (``mel_filters``), log10 clamped at 1e-10, floored at 8 below
    the maximum (80 dB of dynamic range), then ``(x + 4) / 4``.

    Args:
        audio: ``[T]`` or ``[B, T]`` float samples in [-1, 1] at 16 kHz (float64 is computed in float32).
        n_mels: 80 (Whisper up to large-v2) or 128 (large-v3); any positive count works.
        padding: zeros appended before the STFT (openai-whisper's ``transcribe`` passes ``N_SAMPLES``).
        device: where to compute; default: where ``audio`` is (CPU for numpy).

    Returns:
        ``[n_mels, n_frames]`` (or ``[B, n_mels, n_frames]``) float32 with ``n_frames = (T + padding) // 160``.
        In a batch each row is floored at its own maximum (as Hugging Face does), so a row equals the
        spectrogram of that row alone.
    """
    audio = _as_float32_tensor(audio, "log_mel_spectrogram")
    if audio.dim() not in (1, 2):
        raise ValueError(f"log_mel_spectrogram expects audio of shape [T] or [B, T], got {tuple(audio.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if device is not None:
        audio = audio.to(device)
    if padding:
        audio = F.pad(audio, (0, padding))
    if audio.shape[-1] <= N_FFT // 2:
        raise ValueError(
            f"log_mel_spectrogram needs more than {N_FFT // 2} samples (after padding) for its reflect-padded "
            f"STFT, got {audio.shape[-1]}"
        )
    window = _cached_window("hann", N_FFT, audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = stft[..., :-1].abs() ** 2  # [(B,) 201, n_frames]
    mel = _cached_mel_filters(n_mels, audio.device) @ power  # [(B,) n_mels, n_frames]
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)  # [(B,) 1, 1]
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


def _as_float32_tensor(samples: np.ndarray | torch.Tensor, caller: str) -> torch.Tensor:
    if isinstance(samples, np.ndarray):
        samples = torch.from_numpy(np.array(samples))  # a copy: the caller's array may be read-only or reversed
    elif not torch.is_tensor(samples):
        raise TypeError(f"{caller} expects a numpy array or torch tensor, got {type(samples).__name__}")
    if not samples.is_floating_point():
        raise ValueError(
            f"{caller} expects float samples in [-1, 1], got {samples.dtype} (divide int16 PCM by 32768)"
        )
    return samples.float()


# ---------------------------------------------------------------------------------------------------------------
# Kaldi filterbank (WeNet)
# ---------------------------------------------------------------------------------------------------------------

_KALDI_PREEMPHASIS = 0.97
_KALDI_LOW_HZ = 20.0  # the mel bank spans 20 Hz .. Nyquist
_FLT_EPSILON = torch.finfo(torch.float32).eps  # log floor: an all-zero frame gives log(2^-23) = -15.942385


def _kaldi_mel_scale(hz):
    """HTK mel scale, 1127 ln(1 + f / 700); math for Python floats, torch for tensors (as torchaudio mixes them)."""
    if torch.is_tensor(hz):
        return 1127.0 * (1.0 + hz / 700.0).log()
    return 1127.0 * math.log(1.0 + hz / 700.0)


@lru_cache(maxsize=None)
def _kaldi_mel_banks(num_bins: int, padded_window: int, sample_rate: float) -> torch.Tensor:
    """Kaldi's triangular mel bank ``[num_bins, padded_window // 2 + 1]`` float32 (Kaldi ``MelBanks``).

    Triangles are equally spaced on the HTK mel scale between 20 Hz and Nyquist and evaluated in mel (not Hz);
    they have unit peak and no area normalisation; the Nyquist bin gets weight 0. The arithmetic follows
    ``torchaudio.compliance.kaldi.get_mel_banks`` (float32 with Python-float scalars) so that WeNet's features
    are reproduced to float rounding.
    """
    mel_low = _kaldi_mel_scale(_KALDI_LOW_HZ)
    mel_high = _kaldi_mel_scale(0.5 * sample_rate)
    mel_delta = (mel_high - mel_low) / (num_bins + 1)
    index = torch.arange(num_bins).unsqueeze(1)  # [num_bins, 1]
    left = mel_low + index * mel_delta
    center = mel_low + (index + 1.0) * mel_delta
    right = mel_low + (index + 2.0) * mel_delta
    bin_hz = (sample_rate / padded_window) * torch.arange(float(padded_window // 2))  # [padded // 2] float32
    mel = _kaldi_mel_scale(bin_hz).unsqueeze(0)  # [1, padded // 2]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)  # [num_bins, padded // 2]
    return F.pad(banks, (0, 1))  # [num_bins, padded // 2 + 1]: zero weight on the Nyquist bin


def kaldi_fbank(
    waveform: np.ndarray | torch.Tensor,
    sample_rate: int = 16000,
    num_mel_bins: int = 80,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    dither: float = 0.0,
    energy_floor: float = 0.0,
) -> torch.Tensor:
    """Kaldi ``compute-fbank-feats`` log mel filterbank, as WeNet computes it (torchaudio's Kaldi compliance).

    Per frame (``snip_edges``: only whole frames, ``1 + (T - frame_length) // frame_shift`` of them): remove the
    DC offset, pre-emphasis x[n] - 0.97 x[n-1] (x[-1] = x[0]), Povey window (Hann^0.85), zero-pad to the next
    power of two (400 -> 512), power spectrum, Kaldi mel bank (HTK scale, 20 Hz .. Nyquist), natural log
    floored at FLT_EPSILON (an all-zero frame gives -15.942385 in every bin).

    Args:
        waveform: ``[T]`` mono samples **in the 16-bit integer range** (WeNet multiplies float audio by 32768
            before calling Kaldi fbank): pass ``load_audio(...) * 32768`` or int16 PCM directly (integer
            arrays are accepted and converted to float32).
        sample_rate: Hz; the mel bank spans up to ``sample_rate / 2``.
        num_mel_bins: number of mel bins (>= 3, as Kaldi requires).
        frame_length_ms, frame_shift_ms: analysis window and hop in milliseconds.
        dither: standard deviation of Gaussian noise added to each frame (0: deterministic, WeNet's
            inference setting; training configs use 0.1 or 1.0 on the int16 scale).
        energy_floor: floor of Kaldi's frame-energy coefficient. That coefficient is only emitted with
            ``use_energy``, which WeNet leaves off, so it does not change these features; it is accepted so
            that WeNet's ``fbank_conf`` keywords can be passed through unchanged.

    Returns:
        ``[n_frames, num_mel_bins]`` float32 on ``waveform``'s device (``[0, num_mel_bins]`` when ``T`` is
        shorter than one frame).
    """
    wave = torch.from_numpy(np.array(waveform)) if isinstance(waveform, np.ndarray) else waveform  # numpy: a copy
    if not torch.is_tensor(wave):
        raise TypeError(f"kaldi_fbank expects a numpy array or torch tensor, got {type(waveform).__name__}")
    if wave.dim() != 1:
        raise ValueError(f"kaldi_fbank expects a mono waveform of shape [T], got {tuple(wave.shape)}")
    if wave.dtype == torch.bool or wave.is_complex():
        raise ValueError(f"kaldi_fbank expects real samples, got {wave.dtype}")
    if num_mel_bins < 3:
        raise ValueError(f"num_mel_bins must be >= 3 (Kaldi's mel bank needs them), got {num_mel_bins}")
    if sample_rate <= 0 or dither < 0 or energy_floor < 0:
        raise ValueError(
            "kaldi_fbank needs sample_rate > 0, dither >= 0, energy_floor >= 0; "
            f"got {sample_rate}, {dither}, {energy_floor}"
        )
    window_size = int(sample_rate * frame_length_ms * 0.001)  # samples, truncated as Kaldi does
    window_shift = int(sample_rate * frame_shift_ms * 0.001)
    if window_size < 2 or window_shift < 1:
        raise ValueError(
            f"frame_length_ms={frame_length_ms} and frame_shift_ms={frame_shift_ms} give a window of {window_size} "
            f"and a shift of {window_shift} samples at {sample_rate} Hz; need at least 2 and 1"
        )
    wave = wave.float()
    padded_window = 1 << (window_size - 1).bit_length()  # round up to a power of two
    if wave.shape[0] < window_size:
        return wave.new_zeros(0, num_mel_bins)

    frames = wave.unfold(0, window_size, window_shift)  # [F, W] overlapping views, F = 1 + (T - W) // shift
    if dither:
        frames = frames + dither * torch.randn_like(frames)
    frames = frames - frames.mean(dim=1, keepdim=True)  # remove DC offset
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # x[n-1], with x[-1] = x[0]
    frames = frames - _KALDI_PREEMPHASIS * previous
    frames = frames * _cached_window("povey", window_size, frames.device)
    frames = F.pad(frames, (0, padded_window - window_size))  # [F, padded]
    power = torch.fft.rfft(frames).abs().pow(2.0)  # [F, padded // 2 + 1]
    banks = _kaldi_mel_banks(num_mel_bins, padded_window, float(sample_rate)).to(frames.device)
    mel = torch.mm(power, banks.T)  # [F, num_mel_bins]
    return torch.clamp(mel, min=_FLT_EPSILON).log()
