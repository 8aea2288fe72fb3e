from sparsinglaw.cli import main

main()
