"""The teacher cache: format (names, dtypes, codecs, version), writer, reader."""
