"""Teachers, students, projections and feature capture."""
