"""The backup block job (cf. block/backup.c and block/copy-before-write.c); see ``job.py``."""

from blockmirror.jobs.backup.job import BackupJob, BackupParams, BackupTxn
from blockmirror.jobs.backup.start import create_backup
from blockmirror.jobs.backup.sync_bitmap import SyncBitmap

__all__ = ["BackupJob", "BackupParams", "BackupTxn", "SyncBitmap", "create_backup"]
