"""``python -m services.inbound``: the inbound SMTP server until SIGTERM."""

from services.inbound.app import main

if __name__ == "__main__":
    main()
