"""Stage two: train a student from the cache; the teacher is never loaded."""
