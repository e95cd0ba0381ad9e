from gms_deploy.cli import main

main()
