"""Stage one: run the teacher and write its targets to the cache."""
