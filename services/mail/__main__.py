"""`python -m services.mail`: run the mail service until SIGTERM."""

from services.core.runtime import main
from services.mail.app import SERVICE_NAME, build

if __name__ == "__main__":
    main(SERVICE_NAME, build)
