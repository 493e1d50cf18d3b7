"""`python -m services.smtp`: run the SMTP service until SIGTERM."""

from services.core.runtime import main
from services.smtp.app import SERVICE_NAME, build
from services.smtp.settings import SmtpSettings

if __name__ == "__main__":
    main(SERVICE_NAME, build, SmtpSettings)
