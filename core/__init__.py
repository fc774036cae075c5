"""The base layer every Loopline package may import: settings from the environment
(``core.settings``), lake paths and atomic file writes (``core.storage``) and JSON-safe values
(``core.jsonutil``). It imports no other Loopline package."""
