"""``python -m services.submission``: the SMTP submission server until SIGTERM."""

from services.submission.app import main

if __name__ == "__main__":
    main()
