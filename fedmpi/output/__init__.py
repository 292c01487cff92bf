"""What a run leaves behind: metrics files and reports."""
