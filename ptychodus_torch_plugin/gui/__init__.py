"""Qt parameter panel, worker threads and live progress for the Ptychodus GUI."""
