"""pacsbridge: forwards ultrasound studies to hospital PACS/VNA and queries the Modality Worklist."""

__version__ = "0.1.0"
