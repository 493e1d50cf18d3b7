"""`python -m services.mail`: run the mail service until SIGTERM."""

from services.core.runtime import main
from services.mail.app import SERVICE_NAME, build
from services.mail.settings import MailSettings

if __name__ == "__main__":
    main(SERVICE_NAME, build, MailSettings)
