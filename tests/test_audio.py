"""Tests for ``turboformer.audio`` against independent references.

References: Python's ``wave`` module and the raw bytes for decoding; the openai-whisper package (its shipped
``mel_filters.npz``, ``log_mel_spectrogram``, ``pad_or_trim`` and its ffmpeg-CLI ``load_audio``); Hugging Face's
``WhisperFeatureExtractor``; ``kaldi_native_fbank``; the WeNet fixture in ``/work/shared/reference/wenet``
(computed upstream with torchaudio's Kaldi fbank). Real speech comes from the Debian package
``pocketsphinx-testdata``; compressed and video versions of it are made here with PyAV.
"""

from __future__ import annotations

import math
import shutil
import wave
from pathlib import Path

import av
import kaldi_native_fbank as knf
import numpy as np
import pytest
import torch
import whisper.audio as whisper_audio
from transformers import WhisperFeatureExtractor

from turboformer.audio import (
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    AudioError,
    kaldi_fbank,
    load_audio,
    log_mel_spectrogram,
    mel_filters,
    pad_or_trim,
)

POCKETSPHINX_DATA = Path("/usr/share/pocketsphinx/test/data")
WENET_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "wenet"  # /work/shared/...
FLT_EPSILON = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------------------------------------------------------
# Test data
# ---------------------------------------------------------------------------------------------------------------


def _speech_file(relative: str) -> Path:
    path = POCKETSPHINX_DATA / relative
    if not path.is_file():
        pytest.fail(
            f"real-speech test data missing: {path}; install it with `apt-get install pocketsphinx-testdata`"
        )
    return path


def _read_wav_int16(path: Path) -> np.ndarray:
    """[n] int16 of a mono 16-bit WAV, read with the standard library (independent of FFmpeg)."""
    with wave.open(str(path), "rb") as wav:
        assert wav.getnchannels() == 1 and wav.getsampwidth() == 2
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")


def _write_wav(path: Path, channels: np.ndarray, rate: int) -> None:
    """Write ``[C, n]`` floats in [-1, 1] as a 16-bit WAV with the standard library."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels.shape[0])
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(np.round(channels.T * 32767).astype("<i2").tobytes())


@pytest.fixture(scope="module")
def speech() -> tuple[Path, np.ndarray]:
    """A real 2.99 s LibriVox utterance (16 kHz mono s16) and its samples as int16."""
    path = _speech_file("librivox/sense_and_sensibility_01_austen_64kb-0880.wav")
    return path, _read_wav_int16(path)


def _encode(path: Path, pcm: np.ndarray, container: str, codec: str, rate: int = SAMPLE_RATE,
            bit_rate: int | None = None, video: bool = False, options: dict | None = None,
            vbr_quality: int | None = None) -> Path:
    """Encode ``[n]`` int16 16 kHz mono with PyAV (optionally beside a tiny black H.264 video stream).

    ``vbr_quality`` selects variable bit rate at that quality (LAME's -V scale) instead of ``bit_rate``.
    """
    with av.open(str(path), "w", format=container, options=options or {}) as out:
        if video:
            video_stream = out.add_stream("libx264", rate=10)
            video_stream.width = video_stream.height = 32
            video_stream.pix_fmt = "yuv420p"
        audio_stream = out.add_stream(codec, rate=rate)
        audio_stream.layout = "mono"
        if bit_rate:
            audio_stream.bit_rate = bit_rate
        if vbr_quality is not None:
            audio_stream.codec_context.flags |= av.codec.context.Flags.qscale
            audio_stream.codec_context.global_quality = vbr_quality * 118  # FF_QP2LAMBDA
        frame = av.AudioFrame.from_ndarray(pcm[None].astype(np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.pts = SAMPLE_RATE, 0
        to_codec = av.AudioResampler(format=audio_stream.format, layout="mono", rate=rate)
        for converted in to_codec.resample(frame) + to_codec.resample(None):
            out.mux(audio_stream.encode(converted))
        out.mux(audio_stream.encode(None))
        if video:
            for index in range(math.ceil(len(pcm) / SAMPLE_RATE * 10)):
                picture = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
                picture.pts = index
                out.mux(video_stream.encode(picture))
            out.mux(video_stream.encode(None))
    return path


def _align(decoded: np.ndarray, reference: np.ndarray, max_lag: int = 2000) -> int:
    """Lag (samples) of ``decoded`` relative to ``reference`` at the cross-correlation peak."""
    core = reference[max_lag:-max_lag]
    correlation = np.correlate(decoded[: len(reference)], core, mode="valid")  # lags -max_lag .. +max_lag
    return int(np.argmax(correlation)) - max_lag


# ---------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------


def test_wav_equals_standard_library_samples(speech):
    path, pcm = speech
    expected = pcm.astype(np.float32) / 32768.0
    for source in (path, str(path), path.read_bytes()):
        audio = load_audio(source)
        assert audio.dtype == np.float32 and audio.ndim == 1
        np.testing.assert_array_equal(audio, expected)


def test_flac_is_lossless(speech, tmp_path):
    path, pcm = speech
    flac = _encode(tmp_path / "speech.flac", pcm, "flac", "flac")
    np.testing.assert_array_equal(load_audio(flac), pcm.astype(np.float32) / 32768.0)


# (container, codec, codec rate, bit rate, with video, max extra samples at 16 kHz, min SNR dB, min correlation)
# AAC: FFmpeg (and so openai-whisper's ffmpeg call) keeps the encoder's end padding, up to one 1024-sample frame.
# Opus is perceptual (phase is not kept), so its waveform SNR is low; correlation shows it is the same speech.
LOSSY = {
    "mp3": ("mp3", "libmp3lame", 16000, 64000, False, 80, 20.0, 0.99),
    "m4a": ("ipod", "aac", 16000, 64000, False, 1024, 20.0, 0.99),
    "ogg": ("ogg", "libopus", 48000, 64000, False, 80, 10.0, 0.97),
    "mp4": ("mp4", "aac", 16000, 64000, True, 1024, 20.0, 0.99),
    "mkv": ("matroska", "libopus", 48000, 64000, True, 80, 10.0, 0.97),
}


@pytest.mark.parametrize("suffix", sorted(LOSSY))
def test_lossy_and_video_containers_decode_to_the_same_speech(speech, tmp_path, suffix):
    path, pcm = speech
    container, codec, rate, bit_rate, video, max_extra, min_snr_db, min_corr = LOSSY[suffix]
    encoded = _encode(tmp_path / f"speech.{suffix}", pcm, container, codec, rate, bit_rate, video)
    with av.open(str(encoded)) as probe:  # the file really is what the case claims
        assert probe.streams.audio[0].codec_context.codec.id == av.Codec(codec, "w").id
        assert len(probe.streams.video) == int(video)

    audio = load_audio(encoded)
    reference = pcm.astype(np.float32) / 32768.0
    assert audio.dtype == np.float32 and np.abs(audio).max() <= 1.0
    assert 0 <= len(audio) - len(reference) <= max_extra, f"{len(audio)} samples for {len(reference)}"
    assert _align(audio, reference) == 0  # encoder delay removed: no time shift
    decoded = audio[: len(reference)]
    snr_db = 10 * np.log10(np.sum(reference**2) / np.sum((decoded - reference) ** 2))
    assert snr_db >= min_snr_db
    assert np.corrcoef(decoded, reference)[0, 1] >= min_corr


def _sine(frequency: float, rate: int, seconds: float = 1.0) -> np.ndarray:
    return np.sin(2 * np.pi * frequency * np.arange(int(rate * seconds)) / rate)


def _amplitude(audio: np.ndarray, frequency: float, rate: int = SAMPLE_RATE) -> float:
    """Amplitude of a sinusoid at ``frequency`` (edges trimmed off the resampler's transients)."""
    t = np.arange(len(audio)) / rate
    return float(2 * np.abs(np.mean(audio[800:-800] * np.exp(-2j * np.pi * frequency * t[800:-800]))))


def test_8khz_mono_is_resampled_to_16khz(tmp_path):
    path = tmp_path / "sine_8k.wav"
    _write_wav(path, 0.5 * _sine(440, 8000)[None], 8000)
    audio = load_audio(path)
    assert abs(len(audio) - SAMPLE_RATE) <= 1  # 1 s stays 1 s
    spectrum = np.abs(np.fft.rfft(audio[:SAMPLE_RATE] * np.hanning(SAMPLE_RATE)))  # 1 Hz bins
    assert np.argmax(spectrum) == 440
    assert _amplitude(audio, 440) == pytest.approx(0.5, rel=0.01)


def test_44khz_stereo_is_downmixed_and_resampled(tmp_path):
    path = tmp_path / "stereo_44k.wav"
    _write_wav(path, np.stack([0.5 * _sine(440, 44100), 0.3 * _sine(1000, 44100)]), 44100)
    audio = load_audio(path)
    assert abs(len(audio) - SAMPLE_RATE) <= 1
    spectrum = np.abs(np.fft.rfft(audio[:SAMPLE_RATE] * np.hanning(SAMPLE_RATE)))
    assert set(np.argsort(spectrum)[-2:]) == {440, 1000}
    # mono = (left + right) / 2: each tone at half its channel amplitude, and never outside [-1, 1]
    assert _amplitude(audio, 440) == pytest.approx(0.25, rel=0.01)
    assert _amplitude(audio, 1000) == pytest.approx(0.15, rel=0.01)


def test_resampling_matches_openai_whisper_ffmpeg_loader(tmp_path):
    if shutil.which("ffmpeg") is None:
        pytest.fail("the ffmpeg command is missing (openai-whisper's loader, the reference, runs it): "
                    "apt-get install ffmpeg")
    path = tmp_path / "stereo_44k.wav"
    _write_wav(path, np.stack([0.5 * _sine(440, 44100), 0.3 * _sine(1000, 44100)]), 44100)
    ours, theirs = load_audio(path), whisper_audio.load_audio(str(path))
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=2e-4)  # theirs is rounded to 16 bits inside FFmpeg


def test_output_sample_rate_argument(speech):
    path, pcm = speech
    audio = load_audio(path, sample_rate=8000)
    assert abs(len(audio) - len(pcm) // 2) <= 1


def test_goforward_raw_pcm(tmp_path):
    path = _speech_file("goforward.raw")
    expected = np.fromfile(path, dtype="<i2").astype(np.float32) / 32768.0
    np.testing.assert_array_equal(load_audio(path), expected)  # .raw: s16le at 16 kHz by default
    np.testing.assert_array_equal(load_audio(path.read_bytes(), raw_sample_rate=16000), expected)
    renamed = tmp_path / "goforward.bin"
    shutil.copy(path, renamed)
    np.testing.assert_array_equal(load_audio(renamed, raw_sample_rate=16000), expected)

    upsampled = load_audio(path, raw_sample_rate=8000)  # declared 8 kHz: twice as many samples at 16 kHz
    assert abs(len(upsampled) - 2 * len(expected)) <= 2
    # the same waveform stretched: every other output sample lines up with an input sample
    assert np.corrcoef(upsampled[: 2 * len(expected) : 2], expected)[0, 1] > 0.98


def test_valid_file_with_zero_samples_gives_empty_array(tmp_path):
    path = tmp_path / "silence.wav"
    _write_wav(path, np.zeros((1, 0)), SAMPLE_RATE)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.shape == (0,)


def test_unknown_wav_size_and_untagged_vbr_mp3_are_not_called_truncated(speech, tmp_path):
    path, pcm = speech
    streaming = bytearray(path.read_bytes())
    streaming[40:44] = b"\xff\xff\xff\xff"  # data chunk size as streaming writers leave it
    np.testing.assert_array_equal(load_audio(bytes(streaming)), pcm.astype(np.float32) / 32768.0)

    # VBR MP3 without a Xing header, starting with 1 s of silence: FFmpeg estimates its duration from the first
    # (silent, low bit rate) frame, so the estimate overshoots; that must not read as truncation.
    silence_then_speech = np.concatenate([np.zeros(SAMPLE_RATE, np.int16), pcm])
    untagged = _encode(tmp_path / "vbr.mp3", silence_then_speech, "mp3", "libmp3lame", options={"write_xing": "0"},
                       vbr_quality=2)
    assert not any(tag in untagged.read_bytes()[:4096] for tag in (b"Xing", b"Info", b"VBRI"))
    with av.open(str(untagged)) as probe:
        stream = probe.streams.audio[0]
        estimated_s = float(stream.duration * stream.time_base)
    audio = load_audio(untagged)
    assert estimated_s > len(audio) / SAMPLE_RATE + 0.1  # the case the length check must not trip on
    # no gapless tag either: the encoder delay and padding stay in (about 0.1 s)
    assert 0 <= len(audio) - len(silence_then_speech) < 0.15 * SAMPLE_RATE


def _bad_inputs(tmp_path: Path, pcm: np.ndarray) -> dict[str, tuple[object, str]]:
    """name -> (source, text the error message must contain)."""
    wav = tmp_path / "speech.wav"
    _write_wav(wav, pcm[None] / 32768.0, SAMPLE_RATE)
    flac = _encode(tmp_path / "speech.flac", pcm, "flac", "flac")
    mp3 = _encode(tmp_path / "speech.mp3", pcm, "mp3", "libmp3lame", bit_rate=64000)
    m4a = _encode(tmp_path / "speech.m4a", pcm, "ipod", "aac", bit_rate=64000)
    ogg = _encode(tmp_path / "speech.ogg", pcm, "ogg", "libopus", rate=48000)
    webm = _encode(tmp_path / "speech.webm", pcm, "webm", "libopus", rate=48000)
    noise = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()

    def cut(source: Path, fraction: float) -> Path:
        data = source.read_bytes()
        target = tmp_path / f"cut_{fraction}_{source.name}"
        target.write_bytes(data[: int(len(data) * fraction)])
        return target

    def garble(source: Path) -> Path:  # overwrite the middle third with noise
        data = bytearray(source.read_bytes())
        third = len(data) // 3
        data[third : 2 * third] = np.random.default_rng(1).integers(0, 256, third, dtype=np.uint8).tobytes()
        target = tmp_path / f"garbled_{source.name}"
        target.write_bytes(bytes(data))
        return target

    text = tmp_path / "notes.wav"
    text.write_text("These are meeting notes, not audio.\nSecond line.\n")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    odd_raw = tmp_path / "odd.raw"
    odd_raw.write_bytes(pcm[:100].tobytes() + b"\x00")
    video_only = tmp_path / "video_only.mp4"
    with av.open(str(video_only), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for index in range(5):
            picture = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            picture.pts = index
            out.mux(stream.encode(picture))
        out.mux(stream.encode(None))

    return {
        "missing": (tmp_path / "nowhere.wav", "no such file"),
        "directory": (tmp_path, "directory"),
        "empty file": (empty, "empty"),
        "empty bytes": (b"", "empty"),
        "text renamed .wav": (text, "not a recognised audio or video file"),
        "random bytes": (noise, "not a recognised audio or video file"),
        "no audio stream": (video_only, "no audio stream"),
        "truncated wav": (cut(wav, 0.5), "truncated"),
        "truncated flac": (cut(flac, 0.5), "truncated"),
        "truncated mp3": (cut(mp3, 0.5), "truncated"),
        "truncated m4a": (cut(m4a, 0.5), "damaged"),
        "truncated webm": (cut(webm, 0.7), "truncated"),  # the index (moov) is at the end: the header is gone
        "header only ogg": (cut(ogg, 0.002), "truncated"),
        "corrupt flac": (garble(flac), "corrupt"),
        "corrupt mp3": (garble(mp3), "corrupt"),
        "corrupt ogg": (garble(ogg), "corrupt"),
        "odd-length raw": (odd_raw, "even number of bytes"),
    }


def test_bad_inputs_raise_one_line_audio_error(speech, tmp_path):
    _, pcm = speech
    for case, (source, cause) in _bad_inputs(tmp_path, pcm).items():
        with pytest.raises(AudioError) as caught:
            load_audio(source)
        message = str(caught.value)
        assert cause in message, f"{case}: {message}"
        assert "\n" not in message and "Traceback" not in message, f"{case}: {message}"
        name = "<in-memory audio" if isinstance(source, bytes) else str(source)
        assert name in message, f"{case}: {message}"
        error = caught.value  # FFmpeg's exception chain is not shown to the user
        assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__), case
        assert isinstance(error, ValueError)


def test_bad_arguments(speech):
    path, _ = speech
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(path, sample_rate=0)
    with pytest.raises(ValueError, match="raw_sample_rate"):
        load_audio(path, raw_sample_rate=-8000)
    with pytest.raises(TypeError):
        load_audio(12345)


def test_pad_or_trim_matches_openai_whisper():
    rng = np.random.default_rng(0)
    for shape, length, axis in [((1000,), 1500, -1), ((1000,), 600, -1), ((3, 50, 7), 20, 1), ((3, 50, 7), 64, 1)]:
        array = rng.standard_normal(shape).astype(np.float32)
        expected = whisper_audio.pad_or_trim(array, length, axis=axis)
        np.testing.assert_array_equal(pad_or_trim(array, length, axis=axis), expected)
        tensor = pad_or_trim(torch.from_numpy(array), length, axis=axis)
        assert torch.is_tensor(tensor)
        np.testing.assert_array_equal(tensor.numpy(), expected)
    assert pad_or_trim(np.zeros(10)).shape == (N_SAMPLES,)


# ---------------------------------------------------------------------------------------------------------------
# Whisper log-mel
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_equal_whisper_assets(n_mels):
    assets = Path(whisper_audio.__file__).parent / "assets" / "mel_filters.npz"
    with np.load(assets) as shipped:
        expected = shipped[f"mel_{n_mels}"]
    filters = mel_filters(n_mels)
    assert filters.dtype == torch.float32 and filters.shape == (n_mels, 201)
    np.testing.assert_allclose(filters.numpy(), expected, rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def signals(speech) -> dict[str, np.ndarray]:
    _, pcm = speech
    noise = (0.1 * np.random.default_rng(0).standard_normal(24000)).astype(np.float32)
    return {"speech": pcm.astype(np.float32) / 32768.0, "noise": noise}


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_openai_whisper(signals, n_mels):
    for name, audio in signals.items():
        for padding in (0, N_SAMPLES):  # openai-whisper's transcribe() pads 30 s of zeros
            ours = log_mel_spectrogram(audio, n_mels, padding=padding)
            theirs = whisper_audio.log_mel_spectrogram(torch.from_numpy(audio), n_mels, padding=padding)
            assert ours.shape == theirs.shape == (n_mels, (len(audio) + padding) // 160), name
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0, msg=f"{name}, padding {padding}")


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_hugging_face(signals, n_mels):
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    batch = np.stack([pad_or_trim(audio) for audio in signals.values()])  # HF pads every input to 30 s
    theirs = extractor(list(signals.values()), sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    ours = log_mel_spectrogram(batch, n_mels)
    assert ours.shape == theirs.shape == (2, n_mels, N_FRAMES)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-4, rtol=0)
    for row, audio in enumerate(signals.values()):  # each row of a batch is its own spectrogram
        single = log_mel_spectrogram(torch.from_numpy(pad_or_trim(audio)), n_mels)
        torch.testing.assert_close(ours[row], single, atol=1e-6, rtol=0)


def test_log_mel_rejects_bad_input():
    with pytest.raises(ValueError, match="float"):
        log_mel_spectrogram(np.zeros(16000, dtype=np.int16))
    with pytest.raises(ValueError, match="200 samples"):
        log_mel_spectrogram(np.zeros(150, dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        log_mel_spectrogram(np.zeros((1, 2, 16000), dtype=np.float32))
    assert log_mel_spectrogram(np.zeros(150, dtype=np.float32), padding=N_SAMPLES).shape == (80, N_FRAMES)


# ---------------------------------------------------------------------------------------------------------------
# Kaldi fbank (WeNet)
# ---------------------------------------------------------------------------------------------------------------


def _knf_fbank(samples: np.ndarray, rate: int = 16000, bins: int = 80, length_ms: float = 25.0,
               shift_ms: float = 10.0, energy_floor: float = 0.0) -> np.ndarray:
    options = knf.FbankOptions()
    options.frame_opts.samp_freq = rate
    options.frame_opts.frame_length_ms = length_ms
    options.frame_opts.frame_shift_ms = shift_ms
    options.frame_opts.dither = 0.0
    options.frame_opts.snip_edges = True
    options.mel_opts.num_bins = bins
    options.energy_floor = energy_floor
    computer = knf.OnlineFbank(options)
    computer.accept_waveform(rate, samples.astype(np.float32).tolist())
    computer.input_finished()
    if computer.num_frames_ready == 0:
        return np.zeros((0, bins), dtype=np.float32)
    return np.stack([computer.get_frame(i) for i in range(computer.num_frames_ready)])


def test_fbank_reproduces_wenet_fixture():
    if not (WENET_REFERENCE / "expected.npz").is_file():
        pytest.fail(f"WeNet reference fixtures missing: expected them in {WENET_REFERENCE}")
    expected = np.load(WENET_REFERENCE / "expected.npz")
    pcm, reference = expected["wav_samples_int16"], expected["wav_fbank"]
    # WeNet's compute_fbank: float32 int16 / 32768 from the WAV, times 1 << 15, then Kaldi fbank
    waveform = torch.from_numpy(load_audio(WENET_REFERENCE / "example.wav")) * (1 << 15)
    np.testing.assert_array_equal(waveform.numpy(), pcm.astype(np.float32))
    features = kaldi_fbank(waveform, num_mel_bins=80, frame_length_ms=25, frame_shift_ms=10, dither=0.0,
                           energy_floor=0.0, sample_rate=16000).numpy()
    assert features.shape == reference.shape == (1 + (len(pcm) - 400) // 160, 80)
    silent = np.all(reference == np.float32(np.log(FLT_EPSILON)), axis=1)
    assert silent.sum() == 47  # the README's count of all-zero frames: exactly log(FLT_EPSILON) everywhere
    np.testing.assert_array_equal(features[silent], reference[silent])
    # Elsewhere: bit-identical on the CPU of an H200 host (checked there against torchaudio 2.11 too), but float32
    # FFT rounding differs between CPUs and is amplified in near-silent bins (the README suggests atol ~1e-2).
    difference = np.abs(features - reference)
    assert difference.max() < 1e-2
    assert np.percentile(difference, 99.9) < 1e-3 and difference.mean() < 2e-5
    np.testing.assert_allclose(kaldi_fbank(pcm).numpy(), features)  # int16 arrays are taken as they are


def test_fbank_matches_kaldi_native_fbank_on_speech_and_noise(speech):
    _, pcm = speech
    goforward = np.fromfile(_speech_file("goforward.raw"), dtype="<i2")
    noise = (1000 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    for name, samples in {"librivox": pcm, "goforward": goforward, "noise": noise}.items():
        samples = samples.astype(np.float32)
        ours = kaldi_fbank(samples).numpy()
        theirs = _knf_fbank(samples)
        assert ours.shape == theirs.shape == (1 + (len(samples) - 400) // 160, 80), name
        np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0, err_msg=name)


def test_fbank_other_settings_match_kaldi_native_fbank(speech):
    _, pcm = speech
    samples = pcm.astype(np.float32)
    narrowband = samples[::2]  # treated as 8 kHz audio: mel bank up to 4 kHz, 200-sample window, 256-point FFT
    cases = [
        (dict(num_mel_bins=40, frame_length_ms=20.0, frame_shift_ms=12.0), samples,
         {"bins": 40, "length_ms": 20.0, "shift_ms": 12.0}),
        (dict(sample_rate=8000, num_mel_bins=23), narrowband, {"rate": 8000, "bins": 23}),
        (dict(energy_floor=1.0), samples, {"energy_floor": 1.0}),
    ]
    for ours_kwargs, audio, knf_kwargs in cases:
        ours = kaldi_fbank(audio, **ours_kwargs).numpy()
        np.testing.assert_allclose(ours, _knf_fbank(audio, **knf_kwargs), atol=1e-3, rtol=0, err_msg=str(ours_kwargs))
    short = kaldi_fbank(samples[:399])  # shorter than one 400-sample frame
    assert short.shape == (0, 80) and _knf_fbank(samples[:399]).shape == (0, 80)


def test_fbank_dither_and_bad_input():
    silence = np.zeros(16000, dtype=np.float32)
    assert torch.all(kaldi_fbank(silence) == np.float32(math.log(FLT_EPSILON)))
    torch.manual_seed(0)
    dithered = kaldi_fbank(silence, dither=1.0)  # Gaussian noise of one int16 step lifts the floor
    assert torch.all(dithered > math.log(FLT_EPSILON) + 1)
    with pytest.raises(ValueError, match="shape"):
        kaldi_fbank(np.zeros((2, 16000), dtype=np.float32))
    with pytest.raises(ValueError, match="num_mel_bins"):
        kaldi_fbank(silence, num_mel_bins=2)
    with pytest.raises(ValueError, match="dither"):
        kaldi_fbank(silence, dither=-1.0)


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_features_on_cuda_match_cpu():
    rng = np.random.default_rng(0)
    t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    chirp = 0.5 * np.sin(2 * np.pi * (100 + 1000 * t) * t) * (t < 2)  # ends in digital silence
    audio = (chirp + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
    for n_mels in (80, 128):
        cpu = log_mel_spectrogram(audio, n_mels, padding=N_SAMPLES)
        gpu = log_mel_spectrogram(audio, n_mels, padding=N_SAMPLES, device="cuda")
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)  # cuFFT vs pocketfft rounding
    pcm = torch.from_numpy(np.round(audio * 32767))
    cpu = kaldi_fbank(pcm)
    gpu = kaldi_fbank(pcm.cuda())
    assert gpu.device.type == "cuda"
    # float32 FFT rounding is relative to a frame's loudest bins, so quiet bins differ most (README of the WeNet
    # fixture: up to ~1e-2 between implementations); on average the two agree far more closely
    difference = (gpu.cpu() - cpu).abs()
    assert difference.max() < 1e-2 and difference.mean() < 1e-4
