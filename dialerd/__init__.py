"""dialerd: places calls through the Vonage AI Studio make-call API at each agent's rate."""

__version__ = "0.1.0"
